"""Prompt sets: reading, normalising, de-duplicating, and caching their embeddings.

Normalisation (:func:`normalize_prompt`, the one rule for every prompt that enters att3d: the command line of
``generate``, ``interpolate`` and ``refine``, prompt files, prompt sets, the Python API):

- the text is put in Unicode NFC form (a composed and a decomposed "é" are the same prompt);
- a byte-order mark (U+FEFF) is removed wherever it is;
- every white-space character (:meth:`str.isspace`: tab, new line, form feed, vertical tab, ``\\x1c``-``\\x1f``,
  ``\\x85``, no-break space, U+2028 / U+2029, ...) counts as white space: surrounding white space is stripped and
  inner runs become one space;
- any other control character (NUL, ESC, DEL, the C1 controls, Unicode category ``Cc``) and lone surrogates (bytes
  of a command line that were not UTF-8) are refused with a :class:`PromptError` naming the character and its
  position, never passed on or printed raw;
- an empty prompt is refused.

Prompt files (:func:`read_prompt_file`) are UTF-8 (a UTF-8 byte-order mark is dropped) or UTF-16 *with* a byte-order
mark; UTF-16 without one, other encodings, folders and files over :data:`MAX_PROMPT_FILE_BYTES` are refused with one
line. Lines end at ``\\n`` (or ``\\r\\n``) only: form feed, ``\\x85``, U+2028 and U+2029 inside a line are white
space, not line breaks. Blank lines and ``#`` comment lines are skipped, every other line is normalised (an error
names its line number), and repeated prompts are kept once (first occurrence wins, with a warning).
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import stat
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from att3d.registry import PROMPT_SETS
from att3d.text.encoders import TextEmbedding
from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)

#: Largest prompt file read (bytes); a bigger one (or an endless device such as /dev/zero) is refused.
MAX_PROMPT_FILE_BYTES = 256 << 20
#: Characters of a prompt shown in warnings and tables (:func:`shorten`).
PREVIEW_CHARS = 80

# Names of the control characters people meet; others are shown by code point only.
_CONTROL_NAMES = {0x00: "NUL", 0x07: "BEL", 0x08: "BACKSPACE", 0x1B: "ESC", 0x7F: "DEL", 0x9B: "CSI"}


class PromptError(Att3dError):
    """A prompt or prompt file is not usable."""


def _describe(ch: str) -> str:
    name = _CONTROL_NAMES.get(ord(ch)) or unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" ({name})" if name else "")


def normalize_prompt(text: str) -> str:
    """The normalised prompt (see the module docstring): NFC, BOMs removed, white space stripped and collapsed.

    Raises:
        PromptError: not a string, empty, or holding a control character or a lone surrogate (the message names
            the character and its 1-based position, without echoing the prompt).
    """
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a string, got {type(text).__name__}")
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if cat == "Cs":
            raise PromptError(f"not valid UTF-8 text (lone surrogate {_describe(ch)} at character {i + 1})")
        if cat == "Cc" and not ch.isspace():
            raise PromptError(f"holds the control character {_describe(ch)} at character {i + 1}; use plain text")
    text = unicodedata.normalize("NFC", text.replace("\ufeff", ""))
    out = " ".join(text.split())  # str.split: every Unicode white space, U+2028/U+2029 and \x85 included
    if not out:
        raise PromptError("empty prompt")
    return out


def normalize_prompts(prompts: Iterable[str], what: str = "prompt") -> list[str]:
    """:func:`normalize_prompt` of each prompt, in order (duplicates kept); an error names the prompt's number
    (``"prompt 2: empty prompt"``).

    Raises:
        PromptError: a bad prompt, or none at all.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for i, p in enumerate(prompts):
        try:
            out.append(normalize_prompt(p))
        except PromptError as e:
            raise PromptError(f"{what} {i + 1}: {e}") from None
    if not out:
        raise PromptError(f"no {what}s")
    return out


def shorten(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters (``...`` marks a cut), for warnings and tables."""
    text = str(text)
    return text if len(text) <= limit else text[:max(limit - 3, 1)].rstrip() + "..."


def dedupe(prompts: Iterable[str]) -> list[str]:
    """Normalised prompts in order, each once (a warning names the duplicates)."""
    seen: dict[str, None] = {}
    dups = []
    for p in prompts:
        q = normalize_prompt(p)
        if q in seen:
            dups.append(q)
        seen.setdefault(q, None)
    if dups:
        shown = ", ".join(repr(shorten(d, 40)) for d in sorted(set(dups))[:5])
        log.warning("dropped %d duplicate prompt(s): %s", len(dups), shown)
    return list(seen)


def _looks_like_bomless_utf16(data: bytes) -> bool:
    """Whether bytes look like UTF-16 without a byte-order mark: NULs at most even or most odd positions."""
    if len(data) < 2 or b"\x00" not in data:
        return False
    sample = data[:4096]
    even, odd = sample[0::2], sample[1::2]
    return max(even.count(0) / max(len(even), 1), odd.count(0) / max(len(odd), 1)) > 0.3


def decode_prompt_text(data: bytes, name: str) -> str:
    """The text of a prompt file's bytes: UTF-8 (BOM dropped) or UTF-16 with a BOM.

    Raises:
        PromptError: UTF-16 without a BOM, or bytes that are not UTF-8 (naming ``name`` and the byte).
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")  # the BOM says which byte order, and is dropped
        except UnicodeDecodeError as e:
            raise PromptError(f"{name} is not valid UTF-16 text (byte {e.start})") from None
    elif _looks_like_bomless_utf16(data):
        raise PromptError(f"{name} looks like UTF-16 text without a byte-order mark; save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{name} is not UTF-8 text (byte {e.start})") from None


def _read_bytes(path: Path, what: str) -> bytes:
    """At most :data:`MAX_PROMPT_FILE_BYTES` of a file, pipe or device; one-line errors for what is not one."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise PromptError(f"{what} not found: {path}") from None
    except NotADirectoryError:
        raise PromptError(f"{what} not found: {path} (a part of the path is a file, not a folder)") from None
    except OSError as e:
        raise PromptError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise PromptError(f"{what} {path} is a folder, not a file")
    try:
        with open(path, "rb") as f:  # regular files, pipes (<(...)) and devices alike
            data = f.read(MAX_PROMPT_FILE_BYTES + 1)
    except OSError as e:
        raise PromptError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise PromptError(f"{what} {path} is larger than {MAX_PROMPT_FILE_BYTES >> 20} MiB")
    return data


def prompt_lines(text: str, name: str) -> list[str]:
    """The normalised prompts of a prompt file's text, in order, duplicates kept.

    Lines end at ``\\n`` (``\\r\\n`` too) only; blank and ``#`` lines are skipped.

    Raises:
        PromptError: a line with a control character (``"<name> line 3: holds the control character ..."``).
    """
    out = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            out.append(normalize_prompt(line))
        except PromptError as e:
            raise PromptError(f"{name} line {number}: {e}") from None
    return out


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file, one per line (see the module docstring: encodings, line breaks, blank and ``#``
    lines, duplicates dropped).

    ``path`` may be a regular file, a pipe (``--prompts-file <(...)``) or a device.

    Raises:
        PromptError: one line naming the file: not found, a folder, unreadable, too big, not UTF-8 / UTF-16 with a
            BOM, a bad line (with its number), or no prompt at all.
    """
    path = Path(path)
    name = f"prompt file {path}"
    lines = prompt_lines(decode_prompt_text(_read_bytes(path, "prompt file"), name), name)
    if not lines:
        raise PromptError(f"prompt file {path} holds no prompt")
    return dedupe(lines)


def builtin_sets() -> tuple[str, ...]:
    """Names of the registered prompt sets in the order of registration (``att3d.registry.PROMPT_SETS``:
    ``shapes64``, ``shapes64_train``, ``shapes64_heldout``, ...)."""
    return tuple(PROMPT_SETS.names(sort=False))


def builtin_prompts(name: str) -> list[str]:
    """The prompts of a registered set: ``shapes64``, ``shapes64_train`` (56), ``shapes64_heldout`` (8), ..."""
    if name not in PROMPT_SETS:
        raise PromptError(f"unknown prompt set {name!r}; built-in sets: {', '.join(builtin_sets())}")
    return list(PROMPT_SETS.build(name))


def resolve_prompts(spec: str | Sequence[str], base_dir: str | os.PathLike | None = None) -> list[str]:
    """Prompts from a registered set name (``att3d.registry.PROMPT_SETS``), a file path (relative to
    ``base_dir``) or a list of prompts."""
    if isinstance(spec, str):
        if spec in PROMPT_SETS:
            return builtin_prompts(spec)
        path = Path(spec)
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = Path(base_dir) / path
        return read_prompt_file(path)
    return dedupe(spec)


class PromptBank:
    """A fixed, ordered set of prompts with their embeddings computed once.

    Args:
        prompts: the prompts (normalised and de-duplicated here).
    """

    def __init__(self, prompts: Sequence[str]):
        self.prompts: list[str] = dedupe(prompts)
        if not self.prompts:
            raise PromptError("the prompt set is empty")
        self.index = {p: i for i, p in enumerate(self.prompts)}
        self._cache: dict[str, TextEmbedding] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def key(self, tag: str) -> str:
        h = hashlib.sha1("\n".join(self.prompts).encode()).hexdigest()[:12]
        return f"{tag}-{h}"

    def embeddings(self, tag: str, encode, cache_dir: str | os.PathLike | None = None,
                   verify: bool = False) -> TextEmbedding:
        """Embeddings of all prompts by ``encode(list[str]) -> TextEmbedding``, computed once per ``tag``.

        ``tag`` identifies the encoder (its name and configuration). Prompts are embedded in batches of
        :data:`~att3d.text.embedding_cache.DEFAULT_BATCH`. With ``cache_dir`` the batches stream to the on-disk
        embedding cache (:class:`~att3d.text.embedding_cache.EmbeddingCache`, keyed by ``tag`` and prompt text)
        and come back memory-mapped, so memory stays bounded whatever the number of prompts, a later start-up
        embeds only prompts that no earlier one did, and a machine without the encoder's weights can train from
        the cache. ``verify`` compares one cached row with a fresh embedding first (see
        :meth:`~att3d.text.embedding_cache.EmbeddingCache.get`).
        """
        if tag in self._cache:
            return self._cache[tag]
        count = getattr(encode, "token_count", None) if cache_dir is not None else None
        limit = getattr(encode, "max_length", None)

        def fields(batch: list[str]) -> dict[str, torch.Tensor]:
            e = encode(batch)
            out = {"tokens": e.tokens, "mask": e.mask.bool(), "pooled": e.pooled}
            if count is not None and limit is not None:  # kept, to warn of truncation when read from the cache
                out["token_count"] = torch.tensor([int(count(p)) for p in batch], dtype=torch.int32)
            return out

        if cache_dir is not None:
            from att3d.text.embedding_cache import EmbeddingCache

            cache = EmbeddingCache(cache_dir, tag)
            out = cache.get(self.prompts, fields, verify=verify)
            counts = out.pop("token_count", None)
            if counts is not None and limit is not None:  # the encoder warned for the prompts it embedded now
                for i in torch.nonzero(counts > int(limit)).flatten().tolist():
                    if i not in cache.encoded:
                        log.warning("prompt %r has %d tokens; truncated to the encoder's %d",
                                    shorten(self.prompts[i]), int(counts[i]), int(limit))
        else:
            out = self.embedding_fields(tag, fields, None)
        emb = TextEmbedding(out["tokens"], out["mask"].bool(), out["pooled"])
        self._cache[tag] = emb
        return emb

    def embedding_fields(self, tag: str, encode, cache_dir: str | os.PathLike | None = None,
                         verify: bool = False) -> dict[str, torch.Tensor]:
        """Per-prompt tensors of all prompts by ``encode(list[str]) -> {field: (B, ...) tensor}``, in batches.

        Without ``cache_dir`` the batches are concatenated in memory; with it they go through the on-disk cache
        as in :meth:`embeddings`.
        """
        from att3d.text.embedding_cache import DEFAULT_BATCH, EmbeddingCache

        if cache_dir is not None:
            return EmbeddingCache(cache_dir, tag).get(self.prompts, encode, verify=verify)
        chunks = [encode(self.prompts[i:i + DEFAULT_BATCH]) for i in range(0, len(self.prompts), DEFAULT_BATCH)]
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

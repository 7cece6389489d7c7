"""Prompt sets: reading, normalising, de-duplicating, and caching their embeddings.

Normalisation (documented behaviour, applied everywhere a prompt enters att3d):
surrounding white space is stripped, inner runs of white space become one space,
blank lines and ``#`` comment lines of prompt files are skipped, and repeated
prompts are kept once (first occurrence wins, with a warning). An empty prompt or
a file that is not UTF-8 is an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from att3d.registry import PROMPT_SETS
from att3d.text.encoders import TextEmbedding
from att3d.utils.errors import Att3dError
from att3d.utils.files import read_utf8_text

log = logging.getLogger(__name__)


class PromptError(Att3dError):
    """A prompt or prompt file is not usable."""


def normalize_prompt(text: str) -> str:
    """Strip and collapse white space; raise :class:`PromptError` for an empty prompt."""
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a string, got {type(text).__name__}")
    out = re.sub(r"\s+", " ", text).strip()
    if not out:
        raise PromptError("empty prompt")
    return out


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
        log.warning("dropped %d duplicate prompt(s): %s", len(dups), ", ".join(sorted(set(dups))[:5]))
    return list(seen)


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file, one per line (blank and ``#`` lines skipped, duplicates dropped)."""
    path = Path(path)
    text = read_utf8_text(path, "prompt file", PromptError)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
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

    def embeddings(self, tag: str, encode, cache_dir: str | os.PathLike | None = None) -> TextEmbedding:
        """Embeddings of all prompts by ``encode(list[str]) -> TextEmbedding``, computed once.

        ``tag`` names the encoder (the cache key); with ``cache_dir`` they are also kept on disk as
        safetensors, so that a machine without the encoder's weights can train from the cache.
        """
        if tag in self._cache:
            return self._cache[tag]
        path = Path(cache_dir) / f"{self.key(tag)}.safetensors" if cache_dir else None
        if path is not None and path.is_file():
            from att3d.utils.checkpoint import load_tensors

            t = load_tensors(path)
            emb = TextEmbedding(t["tokens"], t["mask"].bool(), t["pooled"])
        else:
            chunks = [encode(self.prompts[i:i + 256]) for i in range(0, len(self.prompts), 256)]
            emb = TextEmbedding.cat(chunks)
            if path is not None:
                from att3d.utils.checkpoint import save_tensors

                save_tensors(path, {"tokens": emb.tokens, "mask": emb.mask.to(torch.uint8), "pooled": emb.pooled})
        self._cache[tag] = emb
        return emb

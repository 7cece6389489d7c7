"""An on-disk cache of per-prompt embeddings, keyed by encoder and prompt text, read memory-mapped.

A cache folder holds one subfolder per encoder (its *tag*: the encoder's name and full configuration), and in it
*shards*: folders of ``.npy`` arrays whose row ``i`` belongs to the prompt whose SHA-256 digest is row ``i`` of
``keys.npy``::

    <root>/<tag-slug>-<hash>/tag.json
    <root>/<tag-slug>-<hash>/shard-<time>-<random>/keys.npy     (N, 16) uint8
                                                  /<field>.npy  (N, ...) one per embedding field
                                                  /fields.json  field -> torch dtype

:meth:`EmbeddingCache.get` embeds only the prompts that no shard holds, in batches of ``batch_size`` whose
results are streamed to a new shard (so memory stays bounded by one batch, whatever the number of prompts), and
returns the embeddings of all requested prompts in their order, memory-mapped from disk (copy-on-write: pages are
read on demand and shared with the page cache) when they lie in one shard in that order, as they do after the
first start-up; otherwise they are gathered into one new shard in that order (or into memory when small).

A shard appears under its final name only when complete (written under a temporary name, then renamed), so a
crash never leaves a half shard that is read later, and two processes can fill one cache at the same time (a
prompt in several shards is read from the oldest). Loading uses ``numpy.load(allow_pickle=False)``: a cache
file never runs code. Before cached rows are trusted, one of them is compared with a fresh embedding of its
prompt (the *probe*): a cache written by another version of an encoder is a one-line :class:`EmbeddingCacheError`
instead of silently wrong embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from att3d.utils.checkpoint import WriteError, atomic_write, is_temporary, make_dirs
from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)

#: Environment variable naming the default cache folder (else ``$XDG_CACHE_HOME/att3d/embeddings``).
CACHE_ENV = "ATT3D_EMBEDDING_CACHE"
#: Prompts per encoder call.
DEFAULT_BATCH = 256
#: Gather scattered rows into memory (instead of a new shard) below this many bytes.
GATHER_IN_MEMORY_BYTES = 64 << 20
#: Tolerance of the probe (an encoder's result varies with the batch it is computed in by ~1e-6).
PROBE_ATOL = 1e-4

#: ``encode(prompts) -> {field: (len(prompts), ...) tensor}``
FieldEncoder = Callable[[list[str]], dict[str, torch.Tensor]]

_KEY_BYTES = 16
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
                 torch.bool: np.bool_, torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16,
                 torch.int32: np.int32, torch.int64: np.int64, torch.bfloat16: np.uint16}  # bf16 stored as its bits
_TORCH_DTYPES = {str(k).removeprefix("torch."): k for k in _NUMPY_DTYPES}


class EmbeddingCacheError(Att3dError):
    """The embedding cache cannot be used (it does not match the encoder, or holds unreadable data)."""


def default_cache_dir() -> Path:
    """``$ATT3D_EMBEDDING_CACHE``, else ``$XDG_CACHE_HOME/att3d/embeddings`` (``~/.cache/att3d/embeddings``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "att3d" / "embeddings"


def prompt_key(prompt: str) -> bytes:
    """The cache key of a prompt: the first 16 bytes of the SHA-256 of its UTF-8 text."""
    return hashlib.sha256(prompt.encode("utf-8")).digest()[:_KEY_BYTES]


def _slug(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tag)[:48].strip("._") or "encoder"


class _Shard:
    """One complete shard, memory-mapped."""

    def __init__(self, folder: Path):
        self.folder = folder
        meta = json.loads((folder / "fields.json").read_text())
        if not isinstance(meta, dict) or not meta:
            raise ValueError("fields.json is not a mapping of fields")
        self.keys = np.load(folder / "keys.npy", mmap_mode="r", allow_pickle=False)
        if self.keys.ndim != 2 or self.keys.shape[1] != _KEY_BYTES or self.keys.dtype != np.uint8:
            raise ValueError(f"keys.npy has shape {self.keys.shape}")
        self.dtypes = {str(k): _TORCH_DTYPES[str(v)] for k, v in meta.items()}
        self.arrays: dict[str, np.ndarray] = {}
        for name in self.dtypes:
            arr = np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False)
            if arr.shape[:1] != self.keys.shape[:1]:
                raise ValueError(f"{name}.npy has {arr.shape[0]} rows for {self.keys.shape[0]} keys")
            self.arrays[name] = arr

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def tensor(self, name: str, rows: slice | np.ndarray | None = None) -> torch.Tensor:
        """Field ``name`` as a tensor (rows of the memory map; a copy for an index array)."""
        arr = self.arrays[name] if rows is None else self.arrays[name][rows]
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.dtypes[name] == torch.bfloat16 else t


class _ShardWriter:
    """Streams batches of rows to the ``.npy`` files of a new shard (header first, then raw rows)."""

    def __init__(self, folder: Path, rows: int):
        self.folder = folder
        self.rows = rows
        self.done = 0
        self.files: dict[str, Any] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def _open(self, name: str, sample: torch.Tensor) -> None:
        if sample.dtype not in _NUMPY_DTYPES:
            raise EmbeddingCacheError(f"embedding field {name!r} has dtype {sample.dtype}, which the cache cannot "
                                      "store")
        self._open_file(name, np.dtype(_NUMPY_DTYPES[sample.dtype]), tuple(sample.shape[1:]))
        self.dtypes[name], self.shapes[name] = sample.dtype, tuple(sample.shape[1:])

    def _open_file(self, name: str, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        shape = (self.rows, *row_shape)
        f = open(self.folder / f"{name}.npy", "wb")  # noqa: SIM115 - closed in close()
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": shape})
        self.files[name] = f

    def write(self, keys: np.ndarray, fields: dict[str, torch.Tensor]) -> None:
        n = len(keys)
        if not self.files:
            for name, t in fields.items():
                self._open(name, t)
            self._open_file("keys", np.dtype(np.uint8), (_KEY_BYTES,))
        if set(fields) != set(self.dtypes):
            raise EmbeddingCacheError(f"the encoder returned fields {sorted(fields)}, earlier {sorted(self.dtypes)}")
        for name, t in fields.items():
            if t.shape[0] != n or tuple(t.shape[1:]) != self.shapes[name] or t.dtype != self.dtypes[name]:
                raise EmbeddingCacheError(f"the encoder returned {name} of shape {tuple(t.shape)} ({t.dtype}) for "
                                          f"{n} prompts, earlier (N, {', '.join(map(str, self.shapes[name]))})")
            t = t.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            self._write(name, t.numpy().tobytes())
        self._write("keys", np.ascontiguousarray(keys).tobytes())
        self.done += n

    def _write(self, name: str, data: bytes) -> None:
        try:
            self.files[name].write(data)
        except OSError as e:  # name the file (a write error has no file name of its own)
            raise OSError(e.errno, e.strerror, str(self.folder / f"{name}.npy")) from None

    def close(self) -> None:
        """Close every file (after :meth:`finish` flushed them; after a failure, quietly: the first error counts)."""
        for f in self.files.values():
            try:
                f.close()
            except OSError:
                pass

    def finish(self) -> None:
        if self.done != self.rows:
            raise EmbeddingCacheError(f"shard {self.folder}: {self.done} rows written of {self.rows}")
        for name, f in self.files.items():
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self.folder / f"{name}.npy")) from None
        self.close()
        meta = {k: str(v).removeprefix("torch.") for k, v in self.dtypes.items()}
        (self.folder / "fields.json").write_text(json.dumps(meta, sort_keys=True) + "\n")


class EmbeddingCache:
    """The cache of one encoder under ``root`` (see the module's docstring).

    Args:
        root: the cache folder (shared by every encoder; created when first written).
        tag: what identifies the encoder: its name and full configuration. Two encoders with one tag must give
            the same embeddings (the probe checks one row).
        batch_size: prompts per encoder call.
    """

    def __init__(self, root: str | os.PathLike, tag: str, batch_size: int = DEFAULT_BATCH):
        self.root = Path(root)
        self.tag = str(tag)
        self.batch_size = max(1, int(batch_size))
        self.folder = self.root / f"{_slug(self.tag)}-{hashlib.sha256(self.tag.encode()).hexdigest()[:12]}"
        #: what the last :meth:`get` did: prompts embedded now, and prompts read from the cache
        self.stats = {"embedded": 0, "cached": 0}
        #: positions (in the last :meth:`get`'s prompts) of the prompts that went through the encoder then
        self.encoded: set[int] = set()

    # -- reading ----------------------------------------------------------------------------------------------
    def shards(self) -> list[_Shard]:
        """The complete shards, oldest first (a damaged one is skipped with a warning)."""
        if not self.folder.is_dir():
            return []
        out = []
        for p in sorted(self.folder.glob("shard-*")):
            if not p.is_dir() or is_temporary(p) or not (p / "fields.json").is_file():
                continue
            try:
                out.append(_Shard(p))
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
                log.warning("embedding cache: skipping the damaged shard %s (%s)", p, " ".join(str(e).split()))
        return out

    @staticmethod
    def _index(shards: list[_Shard]) -> dict[bytes, tuple[int, int]]:
        index: dict[bytes, tuple[int, int]] = {}
        for s, shard in enumerate(shards):
            blob = np.ascontiguousarray(shard.keys).tobytes()
            for row in range(len(shard)):
                index.setdefault(blob[row * _KEY_BYTES:(row + 1) * _KEY_BYTES], (s, row))  # the oldest shard wins
        return index

    # -- the one entry point ----------------------------------------------------------------------------------
    def get(self, prompts: Sequence[str], encode: FieldEncoder, verify: bool = True) -> dict[str, torch.Tensor]:
        """The embeddings of ``prompts`` (distinct strings), field by field, in prompt order.

        Prompts that no shard holds are embedded by ``encode`` in batches and written to a new shard first. With
        ``verify``, one cached row is compared with a fresh embedding of its prompt first (one more ``encode`` call).

        Raises:
            EmbeddingCacheError: the cache does not match the encoder (the probe), or shards disagree on fields.
            WriteError: the cache folder cannot be written (no space, read-only, ...); nothing half-written stays.
        """
        prompts = list(prompts)
        if not prompts:
            raise EmbeddingCacheError("no prompts to embed")
        keys = [prompt_key(p) for p in prompts]
        shards = self.shards()
        index = self._index(shards)
        found = [index.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        cached = len(prompts) - len(missing)
        self.encoded = set(missing)
        if cached and verify:
            self.encoded.add(self._probe(prompts, found, shards, encode))
        if missing:
            shard = self._embed(prompts, keys, missing, encode)
            shards.append(shard)
            s = len(shards) - 1
            for row, i in enumerate(missing):
                found[i] = (s, row)
        self.stats = {"embedded": len(missing), "cached": cached}
        return self._assemble(prompts, keys, found, shards)

    def _probe(self, prompts: list[str], found: list, shards: list[_Shard], encode: FieldEncoder) -> int:
        """Compare the first cached row with a fresh embedding of its prompt; returns the prompt's position."""
        i = next(k for k, f in enumerate(found) if f is not None)
        s, row = found[i]
        fresh = encode([prompts[i]])
        shard = shards[s]
        if set(fresh) != set(shard.dtypes):
            raise EmbeddingCacheError(f"embedding cache {shard.folder} holds fields {sorted(shard.dtypes)}, the "
                                      f"encoder gives {sorted(fresh)}: remove {self.folder} or use another "
                                      "embedding_cache")
        for name, value in fresh.items():
            old = shard.tensor(name, slice(row, row + 1))
            value = value.detach().cpu()
            same = old.shape == value.shape and old.dtype == value.dtype and (
                torch.equal(old, value) if not value.is_floating_point()
                else bool(torch.allclose(old.float(), value.float(), atol=PROBE_ATOL, rtol=0)))
            if not same:
                raise EmbeddingCacheError(
                    f"embedding cache {self.folder} does not match the encoder: the cached {name} of "
                    f"{prompts[i][:60]!r} differs from a fresh one (another version of the encoder wrote it?): "
                    "remove that folder or use another embedding_cache")
        return i

    def _embed(self, prompts: list[str], keys: list[bytes], missing: list[int], encode: FieldEncoder) -> _Shard:
        make_dirs(self.folder)
        tag_file = self.folder / "tag.json"
        if not tag_file.is_file():
            payload = json.dumps({"tag": self.tag}, indent=2) + "\n"
            atomic_write(tag_file, lambda tmp: Path(tmp).write_text(payload))
        name = f"shard-{time.time_ns():020d}-{secrets.token_hex(3)}"
        final = self.folder / name
        tmp = self.folder / f".{name}.tmp-{secrets.token_hex(3)}"
        try:
            tmp.mkdir()
            writer = _ShardWriter(tmp, len(missing))
            try:
                t0 = time.perf_counter()
                for start in range(0, len(missing), self.batch_size):
                    rows = missing[start:start + self.batch_size]
                    fields = encode([prompts[i] for i in rows])
                    writer.write(np.frombuffer(b"".join(keys[i] for i in rows), dtype=np.uint8).reshape(-1, 16),
                                 fields)
                    del fields
                    done = start + len(rows)
                    if len(missing) > 4 * self.batch_size and (done // self.batch_size) % 20 == 0:
                        rate = done / max(1e-9, time.perf_counter() - t0)
                        log.info("embedding cache %s: %d / %d prompts (%.0f per second)", self.folder.name, done,
                                 len(missing), rate)
                writer.finish()
            finally:
                writer.close()
            os.rename(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            where = Path(str(getattr(e, "filename", None) or tmp))
            if where == tmp or tmp in where.parents:  # name the shard, not its temporary folder
                where = final / where.relative_to(tmp)
            raise WriteError(where, e.cause if isinstance(e, WriteError) else e,
                             "cannot write the embedding cache (embedding_cache=false keeps the embeddings in "
                             "memory):") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _Shard(final)

    def _assemble(self, prompts: list[str], keys: list[bytes], found: list, shards: list[_Shard]
                  ) -> dict[str, torch.Tensor]:
        first = found[0][0]
        fields = shards[first].dtypes
        for s in {f[0] for f in found}:
            if shards[s].dtypes != fields or any(shards[s].arrays[k].shape[1:] != shards[first].arrays[k].shape[1:]
                                                 for k in fields):
                raise EmbeddingCacheError(f"embedding cache {self.folder}: shards {shards[first].folder.name} and "
                                          f"{shards[s].folder.name} hold different fields; remove the folder")
        start = found[0][1]
        if all(f == (first, start + i) for i, f in enumerate(found)):  # one shard, in order: memory-mapped as is
            return {k: shards[first].tensor(k, slice(start, start + len(prompts))) for k in fields}
        row_bytes = sum(math.prod(shards[first].arrays[k].shape[1:]) * shards[first].arrays[k].itemsize
                        for k in fields)
        if row_bytes * len(prompts) <= GATHER_IN_MEMORY_BYTES:
            return {k: self._gather(shards, found, k) for k in fields}
        # many prompts from several shards (or out of order): one new shard in this order, then memory-mapped
        return self._consolidate(prompts, keys, found, shards, fields)

    @staticmethod
    def _gather(shards: list[_Shard], found: list, name: str) -> torch.Tensor:
        by_shard: dict[int, list[int]] = {}
        for i, (s, _) in enumerate(found):
            by_shard.setdefault(s, []).append(i)
        sample = shards[found[0][0]].tensor(name, np.array([found[0][1]]))
        out = torch.empty((len(found), *sample.shape[1:]), dtype=sample.dtype)
        for s, positions in by_shard.items():
            rows = np.array([found[i][1] for i in positions])
            out[torch.tensor(positions)] = shards[s].tensor(name, rows)
        return out

    def _consolidate(self, prompts: list[str], keys: list[bytes], found: list, shards: list[_Shard],
                     fields: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        def copy_rows(batch: list[str]) -> dict[str, torch.Tensor]:
            at = copy_rows.position  # type: ignore[attr-defined]
            part = found[at:at + len(batch)]
            copy_rows.position = at + len(batch)  # type: ignore[attr-defined]
            return {k: self._gather(shards, part, k) for k in fields}

        copy_rows.position = 0  # type: ignore[attr-defined]
        shard = self._embed(prompts, keys, list(range(len(prompts))), copy_rows)
        return {k: shard.tensor(k) for k in fields}

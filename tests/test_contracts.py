"""Contract tests over every registered part (like diffusers' ``ModelTesterMixin``), parametrised by registry name.

Each kind of part has one contract (``docs/ARCHITECTURE.md``, the class docstrings): output shapes and ranges,
and a save/load round trip where the part has weights: its config resolved to plain JSON values
(``Registry.resolve``) and its ``state_dict`` through safetensors rebuild a part with identical outputs, as a
model folder does. A newly registered part is tested here by name; give it a small configuration in the
``TINY_*`` table of its kind when its defaults are too large for a test (or need weights from the hub).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

# Tiny random-weight Stable Diffusion and DeepFloyd IF folders (module fixtures), shared with test_priors.
from test_priors import if_folder, sd_folder  # noqa: F401

from att3d.registry import EXPORTERS, FIELDS, MAPPINGS, PRIORS, RENDERERS, TEXT_ENCODERS
from att3d.render.cameras import OrbitCameras
from att3d.text.encoders import TextEmbedding
from att3d.utils.checkpoint import load_tensors, save_tensors

B, N = 2, 50
L, D = 4, 8
MAPPING_BUILD_ARGS = ("text_len", "text_dim", "out_shapes")

#: Small keyword arguments per registered name (a name without an entry is built with its defaults).
TINY_FIELDS: dict[str, list[dict[str, Any]]] = {
    "grid": [{"resolutions": [4, 8], "hidden_dim": 8, "latent_dim": 3},
             {"generated": False, "resolutions": [4, 8], "hidden_dim": 8, "text_dim": 5},
             {"resolutions": [4, 12], "hashmap_size": 512, "hidden_dim": 8, "density_activation": "exp"},
             {"resolutions": [4, 8], "hidden_dim": 8, "latent_dim": 3, "latent_mode": "colour"}],
    "triplane": [{"channels": 3, "resolution": 6, "hidden_dim": 8, "latent_dim": 3},
                 {"channels": 2, "resolution": 5, "combine": "sum", "hidden_dim": 8, "latent_dim": 0,
                  "density_activation": "exp"},
                 {"channels": 3, "resolution": 6, "hidden_dim": 8, "latent_dim": 3, "latent_mode": "colour"}],
}
TINY_MAPPINGS: dict[str, dict[str, Any]] = {
    "hypernetwork": {"hidden_dim": 8}, "concat": {"hidden_dim": 8},
    "triplane": {"width": 16, "min_width": 8, "context_dim": 8, "heads": 2, "min_head_dim": 4},
}
#: Outputs a mapping must also produce beside the shared ``out_shapes`` of the contract (e.g. its own kind).
EXTRA_MAPPING_OUTPUTS: dict[str, dict[str, tuple[int, ...]]] = {"triplane": {"triplane": (3, 2, 8, 8)}}
TINY_RENDERERS: dict[str, dict[str, Any]] = {"volume": {"backend": "torch", "num_samples": 8, "num_importance": 4}}
#: Text encoders: kwargs built from the tiny folders of the ``folders`` fixture (name -> folder key).
TINY_TEXT_FOLDERS = {"clip": "clip", "t5": "t5", "mpnet": "mpnet"}  # encoders built on tiny local weights
#: Priors: (fixture giving the folder, extra kwargs).
TINY_PRIORS: dict[str, tuple[str, dict[str, Any]]] = {
    "shapes": ("tiny_prior_dir", {"dtype": "float32"}),
    "stable_diffusion": ("sd_folder", {"device": "cpu", "dtype": "float32", "resolution": 32}),
    "deepfloyd_if": ("if_folder", {"device": "cpu", "dtype": "float32"}),
}


def _variants(table: dict[str, list[dict[str, Any]]], names: list[str]) -> list:
    return [pytest.param(n, kw, id=f"{n}-{i}") for n in names for i, kw in enumerate(table.get(n, [{}]))]


def _json_round_trip(resolved: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(resolved))


def _reload(module: torch.nn.Module, rebuilt: torch.nn.Module, tmp_path: Path) -> torch.nn.Module:
    """``rebuilt`` with ``module``'s state_dict, through a safetensors file."""
    save_tensors(tmp_path / "weights.safetensors", module.state_dict())
    state = load_tensors(tmp_path / "weights.safetensors")
    assert state.keys() == module.state_dict().keys()
    rebuilt.load_state_dict(state)
    return rebuilt


def _embedding(b: int = B, seed: int = 0, length: int = L, dim: int = D) -> TextEmbedding:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1:, -1] = False
    return TextEmbedding(torch.randn(b, length, dim, generator=g) * mask[..., None], mask,
                         torch.randn(b, dim, generator=g))


def _random_cond(shapes: dict[str, tuple[int, ...]], b: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, *s, generator=g) for k, s in shapes.items()}


# -- fields: conditioning_shapes() -> dict; field(points (B,N,3), cond) -> density (B,N) >= 0, rgb (B,N,3) in [0,1]


@pytest.mark.parametrize("name, kwargs", _variants(TINY_FIELDS, FIELDS.names()))
def test_field_contract(name, kwargs, tmp_path):
    torch.manual_seed(0)
    field = FIELDS.build(name, **kwargs)
    shapes = field.conditioning_shapes()
    assert shapes and all(isinstance(k, str) and all(isinstance(d, int) and d > 0 for d in s)
                          for k, s in shapes.items())
    assert float(field.bound) > 0
    cond = {k: v.requires_grad_() for k, v in _random_cond(shapes).items()}
    points = (torch.rand(B, N, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 1.2 * field.bound
    density, rgb = field(points, cond)
    assert density.shape == (B, N) and rgb.shape == (B, N, 3)
    assert (density >= 0).all() and torch.isfinite(density).all()
    assert ((rgb >= 0) & (rgb <= 1)).all()
    assert torch.equal(field.density(points, cond), density)
    (density.sum() + rgb.sum()).backward()
    for k, v in cond.items():  # the mapping network learns through the conditioning
        assert v.grad is not None and v.grad.abs().sum() > 0, k
    # round trip: resolved config (JSON) + state_dict (safetensors) -> the same field
    resolved = _json_round_trip(FIELDS.resolve(name, **kwargs))
    torch.manual_seed(1)
    again = _reload(field, FIELDS.build(name, **resolved), tmp_path)
    assert again.conditioning_shapes() == shapes
    with torch.no_grad():
        d2, c2 = again(points, cond)
    assert torch.equal(d2, density.detach()) and torch.equal(c2, rgb.detach())


# -- mappings: cls(text_len, text_dim, out_shapes, **cfg); forward(TextEmbedding) -> {name: (B, *shape)}


@pytest.mark.parametrize("name", MAPPINGS.names())
@pytest.mark.parametrize("use_tokens", [True, False])
def test_mapping_contract(name, use_tokens, tmp_path):
    out_shapes = {"grid": (12,), "latent": (3,), "planes": (2, 3, 2), **EXTRA_MAPPING_OUTPUTS.get(name, {})}
    kwargs = {**TINY_MAPPINGS.get(name, {}), "use_tokens": use_tokens}
    build = {"text_len": L, "text_dim": D, "out_shapes": out_shapes}
    torch.manual_seed(0)
    mapping = MAPPINGS.build(name, **build, **kwargs).eval()
    emb = _embedding()
    out = mapping(emb)
    assert list(out) == list(out_shapes)
    for k, s in out_shapes.items():
        assert out[k].shape == (B, *s) and torch.isfinite(out[k]).all(), k
    assert not torch.allclose(out["grid"][0], out["grid"][1])  # prompts get their own outputs
    single = mapping(emb.index(slice(1, 2)))  # an item does not depend on the rest of the batch
    assert all(torch.allclose(single[k][0], out[k][1], atol=1e-6) for k in out)
    resolved = _json_round_trip(MAPPINGS.resolve(name, exclude=MAPPING_BUILD_ARGS, **kwargs))
    torch.manual_seed(1)
    again = _reload(mapping, MAPPINGS.build(name, **build, **resolved), tmp_path).eval()
    with torch.no_grad():
        out2 = again(emb)
    assert all(torch.equal(out2[k], out[k]) for k in out)


# -- renderers: renderer(field, cond, cameras (B), resolution) -> rgb (B,H,W,3), opacity (B,H,W), depth (B,H,W)


@pytest.mark.parametrize("name", RENDERERS.names())
def test_renderer_contract(name, tmp_path):
    kwargs = TINY_RENDERERS.get(name, {})
    torch.manual_seed(0)
    field = FIELDS.build("grid", resolutions=[4, 8], hidden_dim=8, latent_dim=0)
    cond = _random_cond(field.conditioning_shapes())
    cams = OrbitCameras.evaluation(B)
    renderer = RENDERERS.build(name, **kwargs).eval()
    out = renderer(field, cond, cams, 8)
    assert out["rgb"].shape == (B, 8, 8, 3)
    assert out["opacity"].shape == out["depth"].shape == (B, 8, 8)
    assert ((out["rgb"] >= 0) & (out["rgb"] <= 1)).all() and ((out["opacity"] >= 0) & (out["opacity"] <= 1)).all()
    assert torch.isfinite(out["depth"]).all() and (out["depth"] >= 0).all()
    assert (out["opacity"][:, 3:5, 3:5] > 0.5).all()  # a fresh field is a ball at the centre
    black = renderer(field, cond, cams, 8, background=None)["rgb"]  # premultiplied colours
    torch.testing.assert_close(out["rgb"], black + (1 - out["opacity"][..., None]), atol=1e-5, rtol=0)
    # training mode: gradients reach the conditioning
    train = {k: v.clone().requires_grad_() for k, v in cond.items()}
    renderer.train()(field, train, cams, 8, generator=torch.Generator().manual_seed(0))["rgb"].mean().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in train.values())
    resolved = _json_round_trip(RENDERERS.resolve(name, **kwargs))
    again = _reload(renderer, RENDERERS.build(name, **resolved), tmp_path).eval()
    out2 = again(field, cond, cams, 8)
    assert all(torch.equal(out2[k], out[k]) for k in out)


# -- text encoders: encoder(list[str]) -> TextEmbedding(tokens (B,L,D), mask (B,L) bool, pooled (B,D))


@pytest.fixture(scope="module")
def text_folders(sd_folder, if_folder, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """Tiny local CLIP and T5 text towers (the prior fixtures' random weights) with their tokenizer."""
    root = tmp_path_factory.mktemp("tiny-text")
    out = {}
    for key, src in (("clip", sd_folder), ("t5", if_folder)):
        shutil.copytree(src / "text_encoder", root / key)
        for f in (src / "tokenizer").iterdir():
            shutil.copy(f, root / key / f.name)
        out[key] = root / key
    # a tiny random MPNet (the mpnet option's architecture) with MiniLM's WordPiece tokenizer files
    import transformers

    from att3d.text.encoders import minilm_path

    cfg = transformers.MPNetConfig(vocab_size=30527, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, pad_token_id=0)
    torch.manual_seed(0)
    transformers.MPNetModel(cfg).save_pretrained(root / "mpnet")
    for f in minilm_path().iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, root / "mpnet" / f.name)
    out["mpnet"] = root / "mpnet"
    return out


@pytest.mark.parametrize("name", TEXT_ENCODERS.names())
def test_text_encoder_contract(name, request):
    kwargs: dict[str, Any] = {}
    if name in TINY_TEXT_FOLDERS:
        from test_priors import TEXT_LEN

        kwargs = {"path": str(request.getfixturevalue("text_folders")[TINY_TEXT_FOLDERS[name]]),
                  "max_length": TEXT_LEN}
    encoder = TEXT_ENCODERS.build(name, **kwargs)
    prompts = ["a red cube", "a blue sphere , front view"]
    emb = encoder(prompts)
    Lm, Dm = int(encoder.max_length), int(encoder.dim)
    assert emb.tokens.shape == (2, Lm, Dm) and emb.mask.shape == (2, Lm) and emb.pooled.shape == (2, Dm)
    assert emb.mask.dtype == torch.bool and emb.mask[:, 0].all() and emb.mask.sum(1)[0] < emb.mask.sum(1)[1]
    assert torch.equal(emb.tokens[~emb.mask], torch.zeros_like(emb.tokens[~emb.mask]))  # zero where padded
    assert torch.isfinite(emb.tokens).all() and torch.isfinite(emb.pooled).all()
    assert all(not p.requires_grad for p in encoder.parameters())  # frozen
    # the resolved config rebuilds the same encoder (its weights come from its path)
    again = TEXT_ENCODERS.build(name, **_json_round_trip(TEXT_ENCODERS.resolve(name, **kwargs)))
    emb2 = again(prompts[::-1])
    torch.testing.assert_close(emb2.tokens, emb.tokens.flip(0))
    torch.testing.assert_close(emb2.pooled, emb.pooled.flip(0))


# -- priors: encode_prompts, predict_noise (B,C,h,w), encode_images (B,3,H,W) in [0,1] -> x0, SDS gradients


@pytest.mark.parametrize("name", PRIORS.names())
def test_prior_contract(name, request):
    from att3d.guidance.priors import DiffusionPrior, PromptConditioning
    from att3d.guidance.sds import ScoreDistillation

    if name not in TINY_PRIORS:
        pytest.fail(f"prior {name!r} has no tiny folder in TINY_PRIORS of {Path(__file__).name}")
    fixture, kwargs = TINY_PRIORS[name]
    prior = PRIORS.build(name, path=str(request.getfixturevalue(fixture)), **kwargs)
    assert isinstance(prior, DiffusionPrior)
    assert all(not p.requires_grad for p in prior.parameters())
    assert prior.alphas_cumprod.shape == (prior.num_train_timesteps,)
    a = prior.alphas_cumprod
    assert (a[1:] <= a[:-1]).all() and 0 < a[-1] < a[0] <= 1
    prompts = ["a red cube", "a blue sphere"]
    cond = prior.encode_prompts(prompts)
    assert isinstance(cond, PromptConditioning) and len(cond) == 2
    cams = OrbitCameras.sample_training(2, torch.Generator().manual_seed(0))
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x0 = prior.encode_images(images)
    h = prior.latent_resolution
    assert x0.shape == (2, prior.latent_channels, h, h) and x0.dtype == torch.float32
    t = torch.tensor([100, prior.num_train_timesteps - 1])
    noise = torch.randn_like(x0)
    x_t = prior.add_noise(x0.detach(), noise, t)
    # clean_estimate inverts the forward process (at t = 100; at T - 1 almost no signal is left to recover)
    torch.testing.assert_close(prior.clean_estimate(x_t[:1], noise[:1], t[:1]), x0.detach()[:1], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        eps = prior.predict_noise(x_t, t, cond, cams, 5.0)
        assert eps.shape == x_t.shape and torch.isfinite(eps).all()
        one = prior.predict_noise(x_t[1:], t[1:], prior.encode_prompts(prompts[1:]), cams.index(torch.tensor([1])),
                                  5.0)
    torch.testing.assert_close(one[0], eps[1], rtol=1e-3, atol=1e-4)  # items are independent
    out = ScoreDistillation(prior, guidance_scale=5.0)(images, cond, cams, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


# -- exporters: exporter(mesh, path) -> the files written; every format loads back in trimesh


def _meshes() -> dict[str, Any]:
    import trimesh

    from att3d.mesh.export import to_trimesh

    box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    verts, faces = torch.tensor(box.vertices, dtype=torch.float32), torch.tensor(box.faces)
    colours = (verts - verts.min(0).values) / (verts.max(0).values - verts.min(0).values)
    uvs = colours[:, :2]
    texture = torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(0))
    return {"coloured": to_trimesh(verts, faces, vertex_colors=colours),
            "textured": to_trimesh(verts, faces, uvs=uvs, texture=texture)}


@pytest.mark.parametrize("kind", ["coloured", "textured"])
@pytest.mark.parametrize("fmt", EXPORTERS.names())
def test_exporter_contract(fmt, kind, tmp_path):
    import trimesh

    from att3d.mesh.export import export_mesh

    mesh = _meshes()[kind]
    path = tmp_path / f"mesh.{fmt}"
    written = EXPORTERS.get(fmt)(mesh, path)
    assert written[0] == path and all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # nothing else
    loaded = trimesh.load(path, force="mesh")
    assert len(loaded.faces) == len(mesh.faces)
    assert abs(loaded.area - mesh.area) < 1e-4 and abs(loaded.volume - mesh.volume) < 1e-4
    assert loaded.visual is not None and loaded.visual.kind in ("vertex", "texture", "face")
    (tmp_path / "other").mkdir()
    again = export_mesh(mesh, tmp_path / "other" / "mesh.bin", fmt)  # the format given, not the suffix
    assert again[0].is_file()

"""Mapping networks: shapes, spectral norm, interpolation, gradients through field and renderer."""

from __future__ import annotations

import math

import pytest
import torch

from att3d.field import GridField
from att3d.mapping import ConcatConditioning, HyperNetwork
from att3d.registry import MAPPINGS
from att3d.render import VolumeRenderer
from att3d.render.cameras import OrbitCameras
from att3d.text.encoders import TextEmbedding

L, D = 4, 32


def make_emb(b: int, seed: int = 0, length: int = L, dim: int = D) -> TextEmbedding:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, length, dim, generator=g)
    return TextEmbedding(tokens, torch.ones(b, length, dtype=torch.bool), torch.randn(b, dim, generator=g))


def mix(a: TextEmbedding, b: TextEmbedding, alpha: float) -> TextEmbedding:
    return TextEmbedding((1 - alpha) * a.tokens + alpha * b.tokens, a.mask | b.mask,
                         (1 - alpha) * a.pooled + alpha * b.pooled)


def top_singular(w: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(w.detach(), 2).item()


def test_registry_names_and_build():
    assert {"hypernetwork", "concat"} <= set(MAPPINGS.names())
    m = MAPPINGS.build("hypernetwork", text_len=L, text_dim=D, out_shapes={"grid": (10,)}, hidden_dim=8)
    assert isinstance(m, HyperNetwork)
    c = MAPPINGS.build("concat", text_len=L, text_dim=D, out_shapes={"text": (6,)})
    assert isinstance(c, ConcatConditioning)


@pytest.mark.parametrize("use_tokens", [True, False])
def test_hypernetwork_output_shapes(use_tokens):
    shapes = {"grid": (100,), "extra": (3, 4, 5)}
    m = HyperNetwork(L, D, shapes, hidden_dim=16, use_tokens=use_tokens)
    out = m(make_emb(3))
    assert set(out) == set(shapes)
    assert out["grid"].shape == (3, 100) and out["extra"].shape == (3, 3, 4, 5)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_concat_output_shapes_and_linear_variant():
    c = MAPPINGS.build("concat", text_len=L, text_dim=D, out_shapes={"text": (7,)}, hidden_dim=0)
    assert isinstance(c.net, torch.nn.Linear)
    assert c(make_emb(5))["text"].shape == (5, 7)
    c2 = ConcatConditioning(L, D, {"text": (7,)}, hidden_dim=12, use_tokens=True)
    assert c2(make_emb(2))["text"].shape == (2, 7)


def test_registry_builds_equivalent_module():
    torch.manual_seed(0)
    a = MAPPINGS.build("hypernetwork", text_len=L, text_dim=D, out_shapes={"grid": (20,)}, hidden_dim=8,
                       output_scale=0.5)
    torch.manual_seed(0)
    b = HyperNetwork(L, D, {"grid": (20,)}, hidden_dim=8, output_scale=0.5)
    a.eval()
    b.eval()
    e = make_emb(2)
    assert torch.allclose(a(e)["grid"], b(e)["grid"])


def test_wrong_token_shape_raises():
    m = HyperNetwork(L, D, {"grid": (10,)}, hidden_dim=8)
    with pytest.raises(ValueError, match="tokens of shape"):
        m(make_emb(2, length=L + 1))


def test_spectral_norm_bounds_top_singular_value():
    torch.manual_seed(0)
    m = HyperNetwork(L, D, {"grid": (3000,)}, hidden_dim=32)
    # raw weights are far from unit norm; the parametrised ones are normalised
    raw = m.fc2.parametrizations.weight.original
    assert top_singular(raw) > 2.0
    for lin in (m.fc1, m.fc2):
        assert abs(top_singular(lin.weight) - 1.0) < 0.05
    m.train()
    e = make_emb(4)
    for _ in range(50):  # one power iteration per training forward
        m(e)
    for lin in (m.fc1, m.fc2):
        assert abs(top_singular(lin.weight) - 1.0) < 0.02
    # the bound survives an optimiser step that inflates the raw weights
    with torch.no_grad():
        m.fc2.parametrizations.weight.original.mul_(10.0)
    for _ in range(3):
        m(e)
    assert abs(top_singular(m.fc2.weight) - 1.0) < 0.01


def test_spectral_linear_divides_the_output_like_the_parametrized_weight():
    # the hypernetwork divides x W^T by sigma instead of W: the same outputs, gradients and power iteration
    import copy

    from att3d.mapping.hypernetwork import spectral_linear

    torch.manual_seed(0)
    for bias in (True, False):
        layer = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(12, 300, bias=bias))
        with torch.no_grad():
            layer.parametrizations.weight.original.mul_(3.0)
        twin = copy.deepcopy(layer)
        x = torch.randn(5, 12)
        for training in (True, True, False):
            layer.train(training)
            twin.train(training)
            want, got = layer(x), spectral_linear(twin, x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            w = torch.randn(5, 300)
            gw = torch.autograd.grad((want * w).sum(), [layer.parametrizations.weight.original])
            gg = torch.autograd.grad((got * w).sum(), [twin.parametrizations.weight.original])
            torch.testing.assert_close(gg[0], gw[0], rtol=1e-4, atol=1e-6)
            for name in ("_u", "_v"):  # the power iteration ran (or not) alike
                assert torch.equal(getattr(twin.parametrizations.weight[0], name),
                                   getattr(layer.parametrizations.weight[0], name))
        plain = torch.nn.Linear(12, 3)
        assert torch.equal(spectral_linear(plain, x), plain(x))


def test_output_is_lipschitz_in_normalised_input():
    torch.manual_seed(0)
    m = HyperNetwork(L, D, {"grid": (500,)}, hidden_dim=16, output_scale=0.2)
    a, b = make_emb(1, 1), make_emb(1, 2)
    for _ in range(20):  # converge the power iterations
        m(a)
    m.eval()
    fa, fb = m(a)["grid"], m(b)["grid"]
    xa = m.norm(a.tokens.reshape(1, -1))
    xb = m.norm(b.tokens.reshape(1, -1))
    silu_lip = 1.1  # max slope of SiLU
    bound = m.scale.item() * silu_lip * (xa - xb).norm().item()
    assert (fa - fb).norm().item() <= bound * 1.02


def test_initial_grid_values_are_small_and_scale_with_output_scale():
    torch.manual_seed(0)
    shapes = {"grid": (20000,)}
    e = make_emb(4)
    rms = {}
    for s in (0.05, 0.5):
        torch.manual_seed(0)
        m = HyperNetwork(L, D, shapes, hidden_dim=32, output_scale=s)
        m.eval()
        rms[s] = m(e)["grid"].square().mean().sqrt().item()
        hidden_rms = m.hidden(e).square().mean().sqrt().item()
        # |W2 h| <= |h| with the documented scale: rms(out) <= output_scale * rms(h)
        assert rms[s] <= s * hidden_rms * 1.02
    assert rms[0.05] < 0.05
    assert math.isclose(rms[0.5] / rms[0.05], 10.0, rel_tol=1e-3)


def test_interpolated_embeddings_give_outputs_between():
    torch.manual_seed(0)
    m = HyperNetwork(L, D, {"grid": (400,)}, hidden_dim=16)
    m.eval()
    a, b = make_emb(1, 1), make_emb(1, 2)
    fa, fb = m(a)["grid"], m(b)["grid"]
    assert torch.allclose(m(mix(a, b, 0.0))["grid"], fa, atol=1e-6)
    assert torch.allclose(m(mix(a, b, 1.0))["grid"], fb, atol=1e-6)
    direction = fb - fa
    proj = []
    for alpha in torch.linspace(0, 1, 11).tolist():
        f = m(mix(a, b, alpha))["grid"]
        proj.append(((f - fa) * direction).sum().item() / direction.square().sum().item())
        # between: closer to both ends than the ends are to each other
        assert (f - fa).norm() <= direction.norm() * 1.001
        assert (f - fb).norm() <= direction.norm() * 1.001
    assert all(p1 > p0 for p0, p1 in zip(proj, proj[1:]))  # moves monotonically from a to b
    assert 0.2 < proj[5] < 0.8


def _tiny_setup(generated: bool):
    field = GridField(generated=generated, resolutions=(4, 6), features_per_level=2, hidden_dim=8, text_dim=5)
    cls = HyperNetwork if generated else ConcatConditioning
    mapping = cls(L, D, field.conditioning_shapes(), hidden_dim=8)
    renderer = VolumeRenderer(backend="torch", num_samples=12, num_importance=4)
    return field, mapping, renderer


@pytest.mark.parametrize("generated", [True, False])
def test_gradients_reach_mapping_through_field_and_renderer(generated):
    torch.manual_seed(0)
    field, mapping, renderer = _tiny_setup(generated)
    emb = make_emb(3)
    cams = OrbitCameras.sample_training(3, torch.Generator().manual_seed(0))
    cond = mapping(emb)
    out = renderer(field, cond, cams, 8)
    target = torch.rand_like(out["rgb"])
    loss = (out["rgb"] - target).square().mean() + out["opacity"].mean()
    loss.backward()
    for name, p in list(mapping.named_parameters()) + list(field.named_parameters()):
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_prompts_get_distinct_grids():
    torch.manual_seed(0)
    m = HyperNetwork(L, D, {"grid": (300,)}, hidden_dim=16)
    out = m(make_emb(2))["grid"]
    assert (out[0] - out[1]).abs().max() > 1e-3

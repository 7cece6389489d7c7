"""LATTE3D's triplane field and generator: sampling, shapes, initial density, learning, files, and every pipeline
the hypernetwork serves (training with interpolation mixing, resume, generation, the mesh stage, refinement,
interpolation), each on a tiny configuration that runs in seconds on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import att3d
from att3d.config import build_trainer
from att3d.config import compose as compose_config
from att3d.field.triplane import (
    PLANE_AXES,
    TriplaneField,
    combine_planes,
    diagonal_lattice,
    plane_coords,
    plane_lattice,
    triplane_sample,
    triplane_sample_reference,
)
from att3d.mapping.triplane import TriplaneGenerator, level_heads, level_widths, num_upsamplings
from att3d.model import AmortizedModel
from att3d.registry import FIELDS, MAPPINGS
from att3d.text.encoders import TextEmbedding

PROMPTS = ["a red cube", "a blue sphere", "a green torus", "a yellow cone"]
TINY_FIELD = {"name": "triplane", "channels": 4, "resolution": 8, "hidden_dim": 8, "latent_dim": 4}
TINY_MAPPING = {"name": "triplane", "width": 16, "min_width": 8, "context_dim": 16, "heads": 2, "min_head_dim": 8}
TINY = {
    "text_encoder": {"name": "minilm", "max_length": 8},
    "mapping": TINY_MAPPING,
    "field": TINY_FIELD,
    "renderer": {"name": "volume", "backend": "torch", "num_samples": 8, "region": "box"},
    "extraction": {"threshold": 2.0},
}


def _emb(b: int, length: int = 5, dim: int = 12, seed: int = 0) -> TextEmbedding:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, -2:] = False
    return TextEmbedding(torch.randn(b, length, dim, generator=g) * mask[..., None], mask,
                         torch.randn(b, dim, generator=g))


@pytest.fixture(scope="module")
def model() -> AmortizedModel:
    torch.manual_seed(0)
    return AmortizedModel(TINY).eval()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    return model.save_pretrained(tmp_path_factory.mktemp("triplane") / "model", extra={"steps": 7})


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


# -- the field ------------------------------------------------------------------------------------------------


def test_sampling_matches_a_hand_computed_case():
    # R = 3: vertices at -1, 0, 1 on every axis; C = 1. Each plane holds a distinct pattern.
    planes = torch.zeros(1, 3, 1, 3, 3)
    planes[0, 0, 0] = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])  # xy: [ix, iy]
    planes[0, 1, 0, 2, 1] = 10.0  # xz: the vertex x = 1, z = 0
    planes[0, 2, 0, 0, 2] = -4.0  # yz: the vertex y = -1, z = 1
    point = torch.tensor([[[0.5, -0.5, 0.25]]])  # vertex units: x 1.5, y 0.5, z 1.25
    out = triplane_sample(planes, point)
    assert out.shape == (1, 1, 3, 1)
    # xy: cell ix 1..2, iy 0..1 at (0.5, 0.5): the mean of 3, 4, 6, 7.
    xy = 0.25 * (3.0 + 4.0 + 6.0 + 7.0)
    # xz: cell ix 1..2, iz 1..2 at (0.5, 0.25); the vertex (2, 1) has weight fx (1 - fz) = 0.5 * 0.75.
    xz = 10.0 * 0.5 * 0.75
    # yz: cell iy 0..1, iz 1..2 at (0.5, 0.25); the vertex (0, 2) has weight (1 - fy) fz = 0.5 * 0.25.
    yz = -4.0 * 0.5 * 0.25
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([xy, xz, yz]))
    torch.testing.assert_close(triplane_sample_reference(planes, point), out)
    # concat keeps the planes apart (B, N, 3C); sum adds them (B, N, C)
    assert combine_planes(out, "concat").tolist() == [[[xy, xz, yz]]]
    torch.testing.assert_close(combine_planes(out, "sum"), torch.tensor([[[xy + xz + yz]]]))
    # product multiplies them (K-planes); concat_product is the three planes, then their product
    torch.testing.assert_close(combine_planes(out, "product"), torch.tensor([[[xy * xz * yz]]]))
    torch.testing.assert_close(combine_planes(out, "concat_product"), torch.tensor([[[xy, xz, yz, xy * xz * yz]]]))


def test_sampling_hits_vertices_matches_the_reference_and_clamps_outside():
    g = torch.Generator().manual_seed(0)
    planes = torch.randn(2, 3, 5, 7, 7, generator=g)
    points = torch.rand(2, 200, 3, generator=g) * 2 - 1
    torch.testing.assert_close(triplane_sample(planes, points), triplane_sample_reference(planes, points))
    # at a vertex (i, j, k): plane p gives its value at the vertex's two indices on PLANE_AXES[p]
    ijk = torch.tensor([2, 5, 6])
    vertex = (-1 + 2 * ijk / 6.0)[None, None].expand(2, 1, 3)
    out = triplane_sample(planes, vertex)
    for p, (a, b) in enumerate(PLANE_AXES):
        torch.testing.assert_close(out[:, 0, p], planes[:, p, :, ijk[a], ijk[b]])
    assert plane_coords(vertex)[0, 1, 0].tolist() == vertex[0, 0, [0, 2]].tolist()
    # outside the box: the border value; a shared (batch 1) triplane serves every point set
    far = torch.tensor([[[3.0, -3.0, 0.0]]])
    torch.testing.assert_close(triplane_sample(planes[:1], far), triplane_sample(planes[:1], far.clamp(-1, 1)))
    shared = triplane_sample(planes[:1], points)
    torch.testing.assert_close(shared[1], triplane_sample(planes[:1], points[1:])[0])


def test_diagonal_planes_by_hand_against_the_reference_and_as_a_turn():
    # R = 3: vertices at -1, 0, 1. Plane uy has a spike of 10 at (u = 1, y = 0), plane vy 4 at (v = 0, y = 0).
    planes = torch.zeros(1, 5, 1, 3, 3)
    planes[0, 3, 0, 2, 1] = 10.0
    planes[0, 4, 0, 1, 1] = 4.0
    h = 0.5**0.5
    pts = torch.tensor([[[0.5, 0.0, 0.5], [0.5, 0.0, -0.5], [0.0, 0.5, 0.0]]])  # u, v = (h, 0), (0, h), (0, 0)
    out = triplane_sample(planes, pts)  # (1, 3, 5, 1)
    assert out.shape == (1, 3, 5, 1) and (out[0, :, :3] == 0).all()
    torch.testing.assert_close(out[0, :, 3:, 0], torch.tensor([[10 * h, 4.0], [0.0, 4 * (1 - h)], [0.0, 2.0]]))
    torch.testing.assert_close(plane_coords(pts, 5)[0, 3:, 0], torch.tensor([[h, 0.0], [0.0, 0.0]]))
    g = torch.Generator().manual_seed(1)
    rnd, p = torch.randn(2, 5, 3, 7, 7, generator=g), torch.rand(2, 100, 3, generator=g) * 2 - 1
    torch.testing.assert_close(triplane_sample(rnd, p), triplane_sample_reference(rnd, p), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(triplane_sample(rnd, p)[:, :, :3], triplane_sample(rnd[:, :3], p))
    # what the axis planes xy and yz hold, the diagonal planes uy and vy hold turned 45 degrees about y: a shape
    # and its turn are equally easy (the reason for the option)
    field = TriplaneField(channels=3, resolution=7, combine="sum", diagonal_planes=True, hidden_dim=8,
                          include_position=False, latent_dim=0)
    with torch.no_grad():
        for prm in field.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g))
    axes, turned = torch.zeros(1, 5, 3, 7, 7), torch.zeros(1, 5, 3, 7, 7)
    axes[:, 0], axes[:, 2] = rnd[:1, 0], rnd[:1, 2]
    # yz is stored [c, i_y, i_z], vy [c, i_v, i_y]
    turned[:, 3], turned[:, 4] = rnd[:1, 0], rnd[:1, 2].transpose(-1, -2)
    ball = torch.nn.functional.normalize(p[:1], dim=-1) * p[:1].norm(dim=-1, keepdim=True).clamp(max=1) * 0.99
    x, y, z = ball.unbind(-1)
    turn = torch.stack([(x + z) * h, y, (x - z) * h], dim=-1)  # (u, y, v): where the point lands
    torch.testing.assert_close(field.density(ball, {"planes": turned}), field.density(turn, {"planes": axes}),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="or \\(B, 5, C, R, R\\)"):
        triplane_sample(torch.zeros(1, 4, 1, 3, 3), pts)
    with pytest.raises(ValueError, match="evenly spaced"):
        diagonal_lattice(rnd[:, 3:], torch.tensor([-1.0, -0.5, 0.8, 1.0]))


def test_field_contract_shapes_and_initial_density():
    torch.manual_seed(0)
    field = TriplaneField(channels=4, resolution=8, hidden_dim=8, latent_dim=3)
    assert field.conditioning_shapes() == {"planes": (3, 4, 8, 8), "latent": (3,)}
    assert TriplaneField(latent_dim=0).conditioning_shapes() == {"planes": (3, 8, 32, 32)}
    assert field.features_at(torch.zeros(2, 5, 3), {"planes": torch.zeros(2, 3, 4, 8, 8),
                                                    "latent": torch.zeros(2, 3)}).shape == (2, 5, 12 + 3 + 3)
    assert TriplaneField(channels=4, combine="sum", latent_dim=0).features_at(
        torch.zeros(1, 5, 3), {"planes": torch.zeros(1, 3, 4, 32, 32)}).shape == (1, 5, 4 + 3)
    cond = {"planes": torch.randn(2, 3, 4, 8, 8) * 0.5, "latent": torch.randn(2, 3) * 0.5}
    # forward applies the MLP's first layer part by part: the same as the MLP on the whole input
    trained = TriplaneField(channels=4, resolution=8, hidden_dim=8, latent_dim=3)
    with torch.no_grad():
        trained.mlp[-1].weight.normal_()
        p = torch.rand(2, 20, 3) * 2 - 1
        for c in (cond, {k: v[:1] for k, v in cond.items()}):  # a batch of 1 is shared by every point set
            torch.testing.assert_close(trained.raw(p, c), trained.mlp(trained.features_at(p, c)))
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.95, 0.95, 0.95], [1.2, 0.0, 0.0]]).expand(2, 3, 3)
    density, rgb = field(pts, cond)
    # a fresh field: the bump at the centre (softplus(10 - 4) ~ 6), empty at the corners, zero outside the box
    assert ((density[:, 0] - 6.0).abs() < 0.1).all() and (density[:, 1] < 0.05).all() and (density[:, 2] == 0).all()
    assert ((rgb - 0.5).abs() < 0.05).all()
    with pytest.raises(ValueError, match="cond\\['planes'\\] must be"):
        field(pts, {"planes": torch.zeros(2, 3, 4, 6, 6), "latent": cond["latent"]})
    assert TriplaneField(channels=4, combine="concat_product", latent_dim=0).features_at(
        torch.zeros(1, 5, 3), {"planes": torch.zeros(1, 3, 4, 32, 32)}).shape == (1, 5, 16 + 3)
    with pytest.raises(ValueError, match="combine"):
        TriplaneField(combine="max")


@pytest.mark.parametrize("diagonal,position,latent_mode,scale", [
    (False, True, "input", 1.0), (True, False, "colour", 0.5), (True, True, "input", 2.0)])
def test_concat_decoder_in_channels_first_layout_equals_the_mlp_on_the_features(diagonal, position, latent_mode,
                                                                                scale):
    # raw() applies the decoder to grid_sample's (B, PC, N) output with batched products: the same values and
    # gradients as the MLP on the concatenated (B, N, PC + 3 + latent) features, for B prompts or one shared
    from att3d.field.grid_field import shift_colour

    g = torch.Generator().manual_seed(5)
    field = TriplaneField(channels=3, resolution=6, diagonal_planes=diagonal, hidden_dim=8, num_hidden_layers=3,
                          include_position=position, feature_scale=scale, latent_dim=2, latent_mode=latent_mode)
    with torch.no_grad():
        for prm in field.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    p = torch.rand(3, 40, 3, generator=g) * 1.8 - 0.9
    for batch in (3, 1):
        planes = torch.randn(batch, field.num_planes, 3, 6, 6, generator=g).requires_grad_()
        latent = torch.randn(batch, 2, generator=g).requires_grad_()
        cond = {"planes": planes, "latent": latent}
        want = field.mlp(field.features_at(p, cond))
        if latent_mode == "colour":
            want = shift_colour(want, field.colour_shift, latent)
        got = field.raw(p, cond)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        w = torch.randn(got.shape, generator=g)
        grads_want = torch.autograd.grad((want * w).sum(), [planes, latent, *field.parameters()], allow_unused=True)
        grads_got = torch.autograd.grad((got * w).sum(), [planes, latent, *field.parameters()], allow_unused=True)
        for a, b in zip(grads_got, grads_want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("combine,position,latent_mode,diagonal", [
    ("concat", True, "input", False), ("sum", False, "input", False), ("product", True, "colour", False),
    ("concat_product", False, "input", False), ("concat", True, "colour", False), ("concat", True, "input", True),
    ("sum", True, "input", True), ("concat_product", True, "colour", True)])
def test_lattice_evaluation_equals_the_field_at_the_lattice_points(combine, position, latent_mode, diagonal):
    # mesh extraction evaluates the field on a regular lattice: the plane tables give the same density (and the
    # same gradient), in every combine mode, with or without the diagonal planes, for a batch of prompts
    g = torch.Generator().manual_seed(3)
    field = TriplaneField(channels=4, resolution=9, combine=combine, diagonal_planes=diagonal, hidden_dim=8,
                          include_position=position, latent_dim=3, latent_mode=latent_mode, bound=1.5)
    with torch.no_grad():
        for prm in field.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    planes = torch.randn(2, field.num_planes, 4, 9, 9, generator=g).requires_grad_()
    cond = {"planes": planes, "latent": torch.randn(2, 3, generator=g)}
    axis = torch.linspace(-1.5, 1.5, 13)
    table = plane_lattice(planes.detach()[:, :3], axis / 1.5)
    i, j, k = (torch.randint(0, 13, (300,), generator=g) for _ in range(3))
    points = torch.stack([axis[i], axis[j], axis[k]], dim=-1)
    sampled = triplane_sample(planes.detach(), (points / 1.5)[None].expand(2, -1, -1))
    for p_, (a, b) in enumerate(PLANE_AXES):
        torch.testing.assert_close(table[:, p_, (i, j, k)[a], (i, j, k)[b]], sampled[:, :, p_])
    if diagonal:  # uy at (i + k, j), vy at (i - k + L - 1, j)
        diag = diagonal_lattice(planes.detach()[:, 3:], axis / 1.5)
        torch.testing.assert_close(diag[:, 0, i + k, j], sampled[:, :, 3], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(diag[:, 1, i - k + 12, j], sampled[:, :, 4], atol=1e-5, rtol=1e-5)
    want = field.density(points[None].expand(2, -1, -1), cond)
    got = field.lattice(axis, cond).density(i, j, k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (grad_want,) = torch.autograd.grad(want.sum(), planes)
    (grad_got,) = torch.autograd.grad(got.sum(), planes)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="axis"):
        field.lattice(torch.zeros(2, 2), cond)


def test_mesh_extraction_grids_read_the_triplane_lattice(monkeypatch):
    from att3d.mesh.density import density_grid, surface_density_grid

    torch.manual_seed(0)
    field = TriplaneField(channels=4, resolution=8, hidden_dim=8, latent_dim=3)
    cond = {"planes": torch.randn(2, 3, 4, 8, 8), "latent": torch.randn(2, 3)}
    calls = []
    original = TriplaneField.lattice
    monkeypatch.setattr(TriplaneField, "lattice",
                        lambda self, axis, c: calls.append(len(axis)) or original(self, axis, c))
    dense = density_grid(field, cond, 20)
    assert calls == [20]
    lin = torch.linspace(-1, 1, 20)
    x, y, z = torch.meshgrid(lin, lin, lin, indexing="ij")
    want = field.density(torch.stack([x, y, z], -1).reshape(1, -1, 3).expand(2, -1, -1), cond).reshape(2, 20, 20, 20)
    torch.testing.assert_close(dense, want, rtol=1e-5, atol=1e-5)
    coarse_to_fine, evaluated = surface_density_grid(field, cond, 20, threshold=3.0, step=4)
    assert len(calls) > 1 and set(calls) == {20}
    torch.testing.assert_close(coarse_to_fine[evaluated], dense[evaluated], rtol=1e-5, atol=1e-5)


# -- the generator --------------------------------------------------------------------------------------------


def test_generator_output_shapes_and_structure():
    shapes = {"planes": (3, 8, 32, 32), "latent": (16,)}
    torch.manual_seed(0)
    m = TriplaneGenerator(5, 12, shapes).eval()
    assert m.widths == [64, 32, 16, 16] and m.plane_keys == ["planes"] and m.vector_dim == 16
    assert [b[0][1].heads for b in m.blocks] == [4, 2, 1, 1]
    out = m(_emb(3))
    assert list(out) == ["planes", "latent"]
    assert out["planes"].shape == (3, 3, 8, 32, 32) and out["latent"].shape == (3, 16)
    # any resolution (resized when not seed * 2^k), several plane entries, other shapes from the vector head
    odd = TriplaneGenerator(5, 12, {"code": (2, 3), "a": (3, 2, 12, 12), "b": (3, 1, 12, 12)}, width=16,
                            min_width=8, context_dim=8, heads=2, min_head_dim=4)
    assert odd.widths == [16, 8, 8]
    out = odd(_emb(2))
    assert list(out) == ["code", "a", "b"]
    assert out["code"].shape == (2, 2, 3)
    assert out["a"].shape == (2, 3, 2, 12, 12) and out["b"].shape == (2, 3, 1, 12, 12)
    with pytest.raises(ValueError, match="share one resolution"):
        TriplaneGenerator(5, 12, {"a": (3, 2, 8, 8), "b": (3, 2, 16, 16)})
    # five planes (a triplane field with the diagonal planes): one batch of 5B images, its own embeddings
    five = TriplaneGenerator(5, 12, {"planes": (5, 2, 8, 8), "latent": (3,)}, width=16, min_width=8, context_dim=8,
                             heads=2, min_head_dim=4)
    out = five(_emb(2))
    assert five.num_planes == 5 and five.seed.shape[0] == 5 and five.plane_embed[0].shape[0] == 5
    assert out["planes"].shape == (2, 5, 2, 8, 8) and out["latent"].shape == (2, 3)
    assert not torch.allclose(out["planes"][:, 3], out["planes"][:, 4])
    with pytest.raises(ValueError, match="same number of planes"):
        TriplaneGenerator(5, 12, {"a": (3, 2, 8, 8), "b": (5, 2, 8, 8)})
    with pytest.raises(ValueError, match="tokens of shape"):
        m(_emb(2, length=6))
    assert num_upsamplings(32, 4) == 3 and num_upsamplings(24, 4) == 3 and num_upsamplings(4, 4) == 0
    assert level_widths(3, 64, 24) == [64, 32, 24] and level_heads(64, 4, 16) == 4 and level_heads(8, 4, 16) == 1


def test_generator_reads_real_tokens_only_and_items_are_independent():
    torch.manual_seed(0)
    m = TriplaneGenerator(5, 12, {"planes": (3, 4, 8, 8), "latent": (3,)}, width=16, min_width=8, context_dim=8,
                          heads=2, min_head_dim=4).eval()
    emb = _emb(3)
    out = m(emb)
    noisy = TextEmbedding(emb.tokens + (~emb.mask)[..., None] * 5.0, emb.mask, emb.pooled)  # junk where padded
    again = m(noisy)
    assert all(torch.allclose(out[k], again[k], atol=1e-6) for k in out)
    other = TextEmbedding(emb.tokens.clone(), emb.mask, emb.pooled)
    # a real token changes the planes (through cross-attention; the pooled vector is the same)
    other.tokens[:, 0] += torch.randn(12, generator=torch.Generator().manual_seed(5))
    assert (m(other)["planes"] - out["planes"]).abs().max() > 1e-4
    one = m(emb.index(slice(2, 3)))
    assert all(torch.allclose(one[k][0], out[k][2], atol=1e-5) for k in out)


def test_code_from_text_reads_the_pooled_embedding_in_one_linear_layer():
    torch.manual_seed(0)
    kw = dict(width=16, min_width=8, context_dim=8, heads=2, min_head_dim=4)
    shapes = {"planes": (3, 4, 8, 8), "latent": (3,)}
    plain = TriplaneGenerator(5, 12, shapes, **kw).eval()
    texted = TriplaneGenerator(5, 12, shapes, code_from_text=True, **kw).eval()
    assert plain.vector_head[1].in_features == 48 and texted.vector_head[1].in_features == 48 + 12
    emb = _emb(3)
    # with the feature columns zeroed, the code is a linear function of the layer-normed pooled embedding alone
    with torch.no_grad():
        texted.vector_head[1].weight[:, :48] = 0
    code = texted(emb)["latent"]
    pooled = torch.nn.functional.layer_norm(emb.pooled, (12,))
    expected = pooled @ texted.vector_head[1].weight[:, 48:].T + texted.vector_head[1].bias
    assert torch.allclose(code, expected, atol=1e-5)
    # and the pooled embedding changes the code directly (the planes' generator is the same module either way)
    nudge = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    other = TextEmbedding(emb.tokens, emb.mask, emb.pooled + nudge)
    assert (texted(other)["latent"] - code).abs().max() > 1e-3
    assert plain(emb)["planes"].shape == texted(emb)["planes"].shape == (3, 3, 4, 8, 8)


def test_position_embedding_starts_at_zero_and_places_features_where_it_is_set():
    kw = dict(width=16, min_width=8, context_dim=8, heads=2, min_head_dim=4)
    shapes = {"planes": (3, 4, 16, 16), "latent": (3,)}
    torch.manual_seed(0)
    plain = TriplaneGenerator(5, 12, shapes, **kw).eval()
    torch.manual_seed(0)
    placed = TriplaneGenerator(5, 12, shapes, positions=True, **kw).eval()
    assert placed.position_embed is not None and plain.position_embed is None
    assert [tuple(p.shape) for p in placed.position_embed] == [(3, 16, 4, 4), (3, 8, 8, 8), (3, 8, 16, 16)]
    emb = _emb(2)
    out_plain, out_placed = plain(emb), placed(emb)
    assert all(torch.equal(out_plain[k], out_placed[k]) for k in out_plain)  # zero at the start: the same generator
    # an embedding set at one pixel of the last level of plane 1 changes that plane there, not the other planes
    # (and elsewhere on it only through the GroupNorms' statistics)
    with torch.no_grad():
        placed.position_embed[-1][1, :, 3, 12] = 0.5
        moved = placed(emb)
    diff = (moved["planes"] - out_placed["planes"]).abs().amax(dim=2)  # (B, 3, R, R)
    assert diff[:, 0].max() == 0 and diff[:, 2].max() == 0
    far = diff[:, 1].clone()
    far[:, 1:6, 10:15] = 0  # the conv block's two 3x3 convolutions reach two pixels away
    assert (diff[:, 1, 3, 12] > 10 * far.amax(dim=(1, 2))).all()
    assert torch.equal(moved["latent"], out_placed["latent"])  # the code reads level 0 only


def test_default_size_and_initial_state():
    """Defaults at the shapes world (MiniLM tokens 16 x 384): a few hundred thousand parameters; fresh planes and
    codes of RMS ~0.3-0.6 that differ between prompts (the hypernetwork's grid: ~0.5); the field's starting
    density is its centre bump."""
    torch.manual_seed(0)
    field = TriplaneField()
    m = TriplaneGenerator(16, 384, field.conditioning_shapes()).eval()
    n = sum(p.numel() for p in m.parameters())
    assert 150_000 < n < 400_000, n
    with torch.no_grad():
        out = m(_emb(4, length=16, dim=384))
        for k, v in out.items():
            rms = v.square().mean().sqrt().item()
            assert 0.15 < rms < 1.0, (k, rms)
            assert (v[0] - v[1]).square().mean().sqrt().item() > 0.5 * rms, k
        pts = torch.tensor([[0.0, 0.0, 0.0], [0.9, -0.9, 0.9]]).expand(4, 2, 3)
        d = field.density(pts, out)
    assert ((d[:, 0] - 6.0).abs() < 0.2).all() and (d[:, 1] < 0.1).all()


# -- learning ---------------------------------------------------------------------------------------------------


def test_mapping_and_field_fit_distinct_targets_per_prompt():
    """Fit two prompts' objects (a red ball, a blue box) in density and colour: the loss falls and each prompt
    gets its own object."""
    torch.manual_seed(0)
    field = TriplaneField(channels=4, resolution=16, hidden_dim=16, latent_dim=4)
    m = TriplaneGenerator(5, 12, field.conditioning_shapes(), width=32, min_width=16, context_dim=16, heads=2)
    emb = _emb(2, seed=3)
    g = torch.Generator().manual_seed(1)
    pts = (torch.rand(2, 2048, 3, generator=g) * 2 - 1) * 0.9
    ball = pts[0].norm(dim=-1) < 0.5
    box = (pts[1].abs() < 0.4).all(dim=-1)
    target_d = torch.stack([ball, box]).float() * 10.0
    target_rgb = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.2, 0.9]])[:, None].expand(2, 2048, 3)
    opt = torch.optim.Adam([*m.parameters(), *field.parameters()], lr=3e-3)
    losses = []
    for _ in range(150):
        d, rgb = field(pts, m(emb))
        loss = (d - target_d).square().mean() / 25.0 + (rgb - target_rgb).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    with torch.no_grad():
        d, rgb = field(pts, m(emb))
    occ = d > 5.0
    iou = [float((occ[i] & t).sum() / (occ[i] | t).sum()) for i, t in enumerate((ball, box))]
    assert min(iou) > 0.7, iou
    assert rgb[0, ball, 0].mean() > 0.6 and rgb[1, box, 2].mean() > 0.6


# -- files ----------------------------------------------------------------------------------------------------


def test_save_load_round_trip_records_every_argument(model, model_dir):
    cfg = json.loads((model_dir / "model_config.json").read_text())
    for part, registry, exclude in (("field", FIELDS, ()), ("mapping", MAPPINGS, ("text_len", "text_dim",
                                                                                  "out_shapes"))):
        assert cfg[part] == {"name": "triplane", **registry.resolve("triplane", exclude=exclude,
                                                                    **{k: v for k, v in TINY[part].items()
                                                                       if k != "name"})}
    assert cfg["field"]["combine"] == "concat" and cfg["mapping"]["blocks_per_level"] == 1
    again = att3d.load(model_dir)
    with torch.no_grad():
        a, b = model.conditioning(PROMPTS), again.conditioning(PROMPTS)
        assert all(torch.equal(a[k], b[k]) for k in a)
        pts = torch.rand(4, 64, 3) * 2 - 1
        for x, y in zip(model.field(pts, a), again.field(pts, b)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("mapping", ["triplane", "hypernetwork"])
def test_diagonal_planes_model_round_trip_and_meshes_from_the_lattice(mapping, tmp_path):
    # either mapping writes the five planes; the folder records the option; extraction's lattice equals the field
    torch.manual_seed(0)
    config = {**TINY, "field": {**TINY_FIELD, "diagonal_planes": True},
              "mapping": TINY_MAPPING if mapping == "triplane" else {"name": "hypernetwork", "hidden_dim": 8}}
    model = AmortizedModel(config).eval()
    folder = model.save_pretrained(tmp_path / "model")
    assert json.loads((folder / "model_config.json").read_text())["field"]["diagonal_planes"] is True
    again = att3d.load(folder)
    with torch.no_grad():
        cond, cond2 = model.conditioning(PROMPTS[:2]), again.conditioning(PROMPTS[:2])
        assert cond["planes"].shape == (2, 5, 4, 8, 8) and torch.equal(cond["planes"], cond2["planes"])
        from att3d.mesh.density import density_grid
        lin = torch.linspace(-1, 1, 12)
        x, y, z = torch.meshgrid(lin, lin, lin, indexing="ij")
        want = again.field.density(torch.stack([x, y, z], -1).reshape(1, -1, 3).expand(2, -1, -1), cond2)
        torch.testing.assert_close(density_grid(again.field, cond2, 12), want.reshape(2, 12, 12, 12),
                                   rtol=1e-5, atol=1e-5)


def test_hydra_groups_compose_the_triplane():
    cfg = compose_config("train", ["mapping=triplane", "field=triplane", "field.resolution=16",
                                   "mapping.blocks_per_level=2"])
    assert cfg["field"] == {"name": "triplane", **FIELDS.resolve("triplane", resolution=16)}
    assert cfg["mapping"] == {"name": "triplane", **MAPPINGS.resolve(
        "triplane", exclude=("text_len", "text_dim", "out_shapes"), blocks_per_level=2)}
    # the triplane recipe: shapes64's phase 1 with the hypernetwork writing a 5-plane 64^2 triplane
    base = compose_config("train", ["experiment=shapes64"])
    tri = compose_config("train", ["experiment=shapes64_triplane"])
    assert tri["field"] == {"name": "triplane", **FIELDS.resolve("triplane", hidden_dim=32, resolution=64,
                                                                 diagonal_planes=True)}
    assert tri["mapping"] == base["mapping"] and base["mapping"]["name"] == "hypernetwork"
    assert {k: v for k, v in tri.items() if k not in ("field", "name", "run_dir")} == \
        {k: v for k, v in base.items() if k not in ("field", "name", "run_dir")}
    # the many-prompt recipe: that triplane on the 5,040 training wordings with the wordings prior
    words = compose_config("train", ["experiment=shapes_wordings"])
    assert words["field"] == tri["field"] and words["mapping"] == tri["mapping"]
    assert words["prompts"] == {"train": "shapes_wordings_train", "heldout": "shapes_wordings_heldout",
                                "eval": "shapes64"}
    assert words["guidance"]["prior"]["path"] == "assets/shapes-prior-wordings"
    assert words["trainer"]["max_steps"] == 2500 and words["trainer"]["interpolation"]["prob"] == 0.5


# -- every pipeline -------------------------------------------------------------------------------------------


def _overrides(prior: Path, prompts_file: Path, run_dir: Path, **extra: object) -> list[str]:
    """A tiny ``att3d train mapping=triplane field=triplane`` run (``extra``: ``trainer__max_steps=2``...)."""
    values = {
        "name": "test", "prompts": "file", "prompts.train": str(prompts_file), "guidance.prior.path": str(prior),
        "mapping": "triplane", "field": "triplane", "text_encoder.max_length": 8,
        **{f"field.{k}": v for k, v in TINY_FIELD.items() if k != "name"},
        **{f"mapping.{k}": v for k, v in TINY_MAPPING.items() if k != "name"},
        "renderer.num_samples": 12, "trainer.resolution": 16, "trainer.batch_size": 4, "trainer.max_steps": 4,
        "trainer.checkpoint_every": 2, "trainer.log_every": 1, "trainer.image_every": 0, "trainer.threads": 1,
        "trainer.device": "cpu", "trainer.interpolation.prob": 0.5, "progress": "false", "run_dir": str(run_dir),
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def _weights(trainer_or_folder) -> dict[str, torch.Tensor]:
    if isinstance(trainer_or_folder, Path):
        from safetensors.torch import load_file

        return load_file(str(trainer_or_folder / "model.safetensors"))
    return {k: v.detach().clone() for k, v in trainer_or_folder.model.state_dict().items()}


def test_training_with_interpolation_mixing_and_exact_resume(tiny_prior_dir, prompts_file, tmp_path):
    def trainer(run: Path, **extra: object):
        cfg = compose_config("train", _overrides(tiny_prior_dir, prompts_file, run, **extra))
        return build_trainer(cfg, run)

    full = trainer(tmp_path / "full")
    assert isinstance(full.model.mapping, TriplaneGenerator) and isinstance(full.model.field, TriplaneField)
    assert full.sampler.interpolation_prob == 0.5
    start = _weights(full)
    reference = _weights(full.fit())
    assert full.sample_batch().n_mix == 2  # half of every batch of 4 are mixtures of two prompts
    assert all(not torch.equal(start[k], reference[k]) for k in start if k.startswith("mapping.blocks"))
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() and r["grad_norm"] > 0 for r in rows)
    half = trainer(tmp_path / "half", trainer__max_steps=2)
    half.fit()
    resumed = trainer(tmp_path / "half")
    final = resumed.fit(resume=True)
    assert resumed.step == 4
    now = _weights(final)
    assert all(torch.equal(now[k], reference[k]) for k in reference)
    loaded = att3d.load(tmp_path / "half" / "model")
    assert isinstance(loaded.mapping, TriplaneGenerator)


def test_generate_refine_and_interpolate(model, model_dir, tiny_prior_dir):
    from att3d.guidance import ScoreDistillation, ShapesPrior
    from att3d.infer import interpolate as interp
    from att3d.train import refine as rf
    from att3d.utils.checkpoint import load_json

    loaded = att3d.load(model_dir)
    meshes = loaded.generate(PROMPTS[:2], batch_size=2, progress=False, grid_resolution=24, texture_size=16)
    assert len(meshes) == 2 and all(len(m.faces) > 0 for m in meshes)  # the initial ball
    frames = interp.render_interpolation(model, PROMPTS[:2], frames=3, resolution=8, batch_size=3, progress=False)
    assert frames.shape == (3, 8, 8, 3) and torch.isfinite(frames).all()
    torch.testing.assert_close(frames[0], interp.render_interpolation(model, PROMPTS[:1] * 2, frames=2, resolution=8,
                                                                      progress=False)[0])
    tiny = ShapesPrior.from_pretrained(tiny_prior_dir)
    prior = ShapesPrior(tiny.unet, tiny.scheduler, model.text_encoder,
                        load_json(tiny_prior_dir / "prior_config.json")["arch"])
    sds = ScoreDistillation(prior, guidance_scale=5.0)
    refined, hist = rf.refine(model, PROMPTS[1], 2, sds, resolution=16, batch_views=2, progress=False)
    with torch.no_grad():
        before, after = model.conditioning([PROMPTS[1]]), refined.conditioning([PROMPTS[1]])
    assert set(after) == {"planes", "latent"} and (after["planes"] - before["planes"]).abs().max() > 1e-5
    assert len(hist.train) == 2 and hist.finite()
    # model mode trains a copy of the generator itself
    whole, _ = rf.refine(model, PROMPTS[1], 1, sds, mode="model", resolution=16, batch_views=2, progress=False)
    assert not torch.equal(whole.model.mapping.seed, model.mapping.seed)


def test_mesh_stage_starts_from_a_triplane_model(model_dir, tiny_prior_dir, prompts_file, tmp_path):
    from att3d.cli.train import main as train_main

    run = tmp_path / "mesh"
    argv = ["stage=mesh", f"init_from={model_dir}", f"run_dir={run}", "prompts=file",
            f"prompts.train={prompts_file}", f"guidance.prior.path={tiny_prior_dir}", "trainer.batch_size=2",
            "trainer.resolution=32", "stage.tet_resolution=16", "trainer.device=cpu", "trainer.threads=1",
            "progress=false", "stage.anchor_points=128", "trainer.log_every=1", "trainer.image_every=0",
            "trainer.max_steps=2", "trainer.checkpoint_every=2"]
    assert train_main(argv) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["faces"] > 0 and r["grad_norm"] > 0 for r in rows)
    out = att3d.load(run / "model")
    assert isinstance(out.field, TriplaneField)
    assert json.loads((run / "model" / "model_config.json").read_text())["extra"]["stage"] == "mesh"


def test_two_gloo_processes_train_like_one(tiny_prior_dir, prompts_file, tmp_path):
    """Data-parallel training (torchrun, 2 gloo processes of 2 prompts) equals one process with the batch of 4
    (the tolerances of tests/test_distributed.py)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    kw = {"trainer__max_steps": 2, "trainer__interpolation__prob": 0.25}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "att3d.cli", "train", *_overrides(tiny_prior_dir, prompts_file, two, **kw)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    build_trainer(compose_config("train", _overrides(tiny_prior_dir, prompts_file, one, **kw)), one).fit()
    a, b = (load_file(str(run / "model" / "model.safetensors")) for run in (two, one))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    assert torch.cat([(a[k] - b[k]).abs().flatten() for k in a]).mean().item() <= 1e-7


def test_the_plane_contract_is_shared_by_the_mapping_and_the_field():
    from att3d.field import triplane as field_triplane
    from att3d.mapping import triplane as mapping_triplane
    from att3d.utils.planes import NUM_PLANES, check_num_planes, is_plane_shape

    assert mapping_triplane.is_plane_shape is is_plane_shape and field_triplane.NUM_PLANES is NUM_PLANES
    assert is_plane_shape((3, 8, 16, 16)) and is_plane_shape((5, 4, 2, 2))
    for shape in [(4, 8, 16, 16), (3, 8, 16, 8), (3, 16, 16), (8, 16, 16, 16), (3, 8, 0, 0)]:
        assert not is_plane_shape(shape)
    assert check_num_planes(5) == 5
    with pytest.raises(ValueError, match="3 planes"):
        check_num_planes(4)

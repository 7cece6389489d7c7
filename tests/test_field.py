"""Grid encodings and the grid field: interpolation exactness, hashing, per-prompt grids, density bump."""

from __future__ import annotations

import pytest
import torch

from att3d.field import GridField, encoding, trunc_exp
from att3d.registry import FIELDS


def vertex_coords(r: int) -> torch.Tensor:
    """(R, R, R, 3) vertex positions in [-1, 1]^3 indexed [ix, iy, iz]."""
    c = torch.linspace(-1.0, 1.0, r)
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], -1)


def linear_grid(r: int, coeffs: torch.Tensor) -> torch.Tensor:
    """(1, F, R, R, R) grid holding F linear functions ``a x + b y + c z + d`` (coeffs (F, 4)) at its vertices."""
    v = vertex_coords(r)
    vals = v @ coeffs[:, :3].T + coeffs[:, 3]  # (R, R, R, F)
    return vals.permute(3, 0, 1, 2)[None]


def test_level_resolutions_geometric():
    assert encoding.level_resolutions(3, 8, 32) == [8, 16, 32]
    assert encoding.level_resolutions(1, 8, 32) == [8]
    res = encoding.level_resolutions(5, 16, 256)
    assert res[0] == 16 and res[-1] == 256 and all(b > a for a, b in zip(res, res[1:]))


def test_dense_sample_reproduces_linear_functions_exactly():
    torch.manual_seed(0)
    coeffs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.5], [0.0, 0.0, -3.0, 0.0], [0.3, -0.7, 1.1, 0.2]])
    for r in (2, 5, 16):
        grid = linear_grid(r, coeffs).expand(2, -1, -1, -1, -1).contiguous()
        pts = torch.rand(2, 500, 3) * 2 - 1
        expected = pts @ coeffs[:, :3].T + coeffs[:, 3]
        got = encoding.dense_grid_sample(grid, pts)
        assert got.shape == (2, 500, 4)
        assert torch.allclose(got, expected, atol=1e-5), r  # per channel: catches any x/y/z axis mix-up


def test_dense_sample_hits_vertex_values():
    torch.manual_seed(0)
    r = 5
    grid = torch.randn(1, 3, r, r, r)
    idx = torch.tensor([[0, 0, 0], [4, 0, 0], [0, 4, 0], [0, 0, 4], [1, 2, 3], [4, 4, 4]])
    pts = (-1 + 2 * idx.float() / (r - 1))[None]
    got = encoding.dense_grid_sample(grid, pts)[0]
    expected = grid[0][:, idx[:, 0], idx[:, 1], idx[:, 2]].T
    assert torch.allclose(got, expected, atol=1e-6)


def test_grid_sample_matches_gather_reference():
    torch.manual_seed(0)
    grid = torch.randn(3, 2, 7, 7, 7)
    pts = torch.rand(3, 300, 3) * 2 - 1
    assert torch.allclose(encoding.dense_grid_sample(grid, pts), encoding.dense_grid_sample_gather(grid, pts),
                          atol=1e-5)
    shared = torch.randn(1, 2, 7, 7, 7)
    assert torch.allclose(encoding.dense_grid_sample(shared, pts), encoding.dense_grid_sample_gather(shared, pts),
                          atol=1e-5)


def test_hash_level_without_collisions_equals_dense_level():
    torch.manual_seed(0)
    r, table_size, f = 6, 2**14, 3
    verts = torch.stack(torch.meshgrid(*(torch.arange(r),) * 3, indexing="ij"), -1).reshape(-1, 3)
    rows = encoding.spatial_hash(verts, table_size)
    assert rows.unique().numel() == r**3, "the test needs a collision-free hash"
    dense = torch.randn(2, f, r, r, r)
    table = torch.zeros(2, table_size, f)
    table[:, rows] = dense.reshape(2, f, -1).transpose(1, 2)
    pts = torch.rand(2, 400, 3) * 2 - 1
    assert torch.allclose(encoding.hash_grid_sample(table, pts, r), encoding.dense_grid_sample(dense, pts), atol=1e-5)


def test_hash_level_is_differentiable_and_collides_when_small():
    torch.manual_seed(0)
    table = torch.randn(1, 64, 2, requires_grad=True)
    pts = torch.rand(2, 50, 3) * 2 - 1
    encoding.hash_grid_sample(table, pts, 32).sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
    verts = torch.stack(torch.meshgrid(*(torch.arange(32),) * 3, indexing="ij"), -1).reshape(-1, 3)
    assert encoding.spatial_hash(verts, 64).max() < 64


def test_layout_hashes_only_large_levels():
    layout = encoding.level_layout([8, 16, 64], 2, 2**14)
    assert [k for k, _, _ in layout] == ["dense", "dense", "hash"]
    assert layout[2][2] == 2**14 * 2
    field = GridField(resolutions=(4, 40), features_per_level=2, hashmap_size=1000, latent_dim=0)
    assert field.conditioning_shapes() == {"grid": (2 * 4**3 + 2 * 1000,)}
    cond = {"grid": torch.randn(2, field.grid_size) * 0.1}
    d, rgb = field(torch.rand(2, 30, 3) * 2 - 1, cond)
    assert d.shape == (2, 30) and rgb.shape == (2, 30, 3)


def test_conditioning_shapes_both_variants():
    gen = GridField(resolutions=(4, 8), features_per_level=3, latent_dim=0)
    assert gen.conditioning_shapes() == {"grid": (3 * (4**3 + 8**3),)}
    coded = GridField(resolutions=(4, 8), features_per_level=3)  # the default: a 16-d per-prompt code too
    assert coded.conditioning_shapes() == {"grid": (3 * (4**3 + 8**3),), "latent": (16,)}
    assert gen.grid is None
    shared = GridField(generated=False, resolutions=(4, 8), features_per_level=3, text_dim=11)
    assert shared.conditioning_shapes() == {"text": (11,)}
    assert shared.grid.shape == (1, 3 * (4**3 + 8**3)) and shared.grid.requires_grad
    assert isinstance(FIELDS.build("grid"), GridField)


def test_registry_build_matches_kwargs():
    f = FIELDS.build("grid", resolutions=[4, 8], hidden_dim=8, blob_density=3.0)
    assert f.resolutions == [4, 8] and f.blob_density == 3.0 and f.mlp[0].out_features == 8


def test_per_prompt_grids_stay_separate():
    torch.manual_seed(0)
    field = GridField(resolutions=(4, 8), hidden_dim=8, latent_dim=0)
    cond = {"grid": torch.randn(3, field.grid_size)}
    pts = torch.rand(3, 64, 3) * 1.6 - 0.8
    d0, c0 = field(pts, cond)
    cond2 = {"grid": cond["grid"].clone()}
    cond2["grid"][1] += torch.randn(field.grid_size)
    d1, c1 = field(pts, cond2)
    assert torch.equal(d0[[0, 2]], d1[[0, 2]]) and torch.equal(c0[[0, 2]], c1[[0, 2]])
    assert (d0[1] - d1[1]).abs().max() > 1e-4
    # gradients of prompt 0's outputs touch only prompt 0's grid
    g = cond["grid"].clone().requires_grad_(True)
    field(pts, {"grid": g})[0][0].sum().backward()
    assert g.grad[0].abs().sum() > 0 and g.grad[1:].abs().sum() == 0


def test_shared_grid_field_reads_text():
    torch.manual_seed(0)
    field = GridField(generated=False, resolutions=(4, 8), hidden_dim=8, text_dim=6)
    pts = torch.rand(2, 40, 3) * 1.6 - 0.8
    text = torch.randn(2, 6)
    d0, _ = field(pts, {"text": text})
    text2 = text.clone()
    text2[0] += 1.0
    d1, _ = field(pts, {"text": text2})
    assert (d0[0] - d1[0]).abs().max() > 1e-5 and torch.equal(d0[1], d1[1])
    with pytest.raises(ValueError, match="cond\\['text'\\]"):
        field(pts, {"text": torch.randn(2, 5)})


@pytest.mark.parametrize("activation", ["softplus", "exp"])
def test_density_bump_makes_centre_dense_and_corners_empty(activation):
    torch.manual_seed(0)
    field = GridField(density_activation=activation)
    from att3d.mapping import HyperNetwork
    from att3d.text.encoders import TextEmbedding

    mapping = HyperNetwork(16, 384, field.conditioning_shapes())
    emb = TextEmbedding(torch.randn(2, 16, 384) * 0.3, torch.ones(2, 16, dtype=torch.bool), torch.randn(2, 384))
    cond = mapping(emb)
    centre = torch.zeros(2, 1, 3)
    corners = torch.tensor([[sx, sy, sz] for sx in (-0.95, 0.95) for sy in (-0.95, 0.95) for sz in (-0.95, 0.95)])
    corners = corners[None].expand(2, -1, -1)
    assert (field.density(centre, cond) > 3.0).all()
    assert (field.density(corners, cond) < 0.05).all()
    # a ray through the empty corner region of the box stays almost transparent
    outside = torch.tensor([[1.5, 0.0, 0.0], [0.0, 0.0, -1.01]])[None].expand(2, -1, -1)
    assert torch.equal(field.density(outside, cond), torch.zeros(2, 2))
    _, rgb = field(torch.rand(2, 100, 3) * 2 - 1, cond)
    assert ((rgb >= 0) & (rgb <= 1)).all()


def test_density_equals_forward_and_is_nonnegative():
    torch.manual_seed(0)
    field = GridField(resolutions=(4, 8), hidden_dim=8, latent_dim=0)
    cond = {"grid": torch.randn(2, field.grid_size) * 3}
    pts = torch.rand(2, 200, 3) * 2.4 - 1.2
    d, _ = field(pts, cond)
    assert torch.equal(field.density(pts, cond), d)
    assert (d >= 0).all()
    outside = ~encoding.inside_box(pts, 1.0)
    assert outside.any() and (d[outside] == 0).all() and (d[~outside] > 0).all()


def test_trunc_exp_clamps_gradient():
    x = torch.tensor([0.0, 20.0], requires_grad=True)
    y = trunc_exp(x)
    assert torch.allclose(y, torch.exp(x.detach()))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.exp(torch.tensor([0.0, 15.0])))


def test_level_gain_scales_features():
    torch.manual_seed(0)
    field = GridField(resolutions=(4,), hidden_dim=8, include_position=False, latent_dim=0)
    cond = {"grid": torch.randn(1, field.grid_size)}
    pts = torch.rand(1, 10, 3) * 2 - 1
    f1 = field.features_at(pts, cond)
    with torch.no_grad():
        field.level_gain.mul_(2.0)
    assert torch.allclose(field.features_at(pts, cond), 2 * f1)


@pytest.mark.parametrize("name, kwargs", [("grid", {"resolutions": [4, 8]}),
                                          ("triplane", {"channels": 4, "resolution": 8})])
def test_latent_mode_colour_shifts_the_colour_only(name, kwargs):
    """``latent_mode="colour"``: the code shifts the colour logits by ``Linear(latent)``; the density is the
    grid's / planes' alone (the code is not an MLP input)."""
    torch.manual_seed(0)
    field = FIELDS.build(name, hidden_dim=8, latent_dim=3, latent_mode="colour", **kwargs)
    plain = FIELDS.build(name, hidden_dim=8, latent_dim=3, **kwargs)
    assert field.conditioning_shapes() == plain.conditioning_shapes()  # the same code from the mapping
    assert field.mlp[0].in_features == plain.mlp[0].in_features - 3 and field.colour_shift.in_features == 3
    with torch.no_grad():
        field.mlp[-1].weight.normal_()
        field.colour_shift.weight.normal_()
    shapes = field.conditioning_shapes()
    g = torch.Generator().manual_seed(1)
    a = {k: torch.randn(2, *s, generator=g) * 0.5 for k, s in shapes.items()}
    b = {**a, "latent": torch.randn(2, 3, generator=g)}
    p = torch.rand(2, 20, 3, generator=g) * 2 - 1
    (da, ca), (db, cb) = field(p, a), field(p, b)
    torch.testing.assert_close(da, db)  # the code does not reach the density
    assert (ca - cb).abs().max() > 1e-2  # it does reach the colour
    # colour = sigmoid(MLP(features, position) + Linear(latent)), hand-computed
    shift = a["latent"] @ field.colour_shift.weight.T + field.colour_shift.bias
    expected = torch.sigmoid(field.mlp(field.features_at(p, a))[..., 1:] + shift[:, None, :])
    torch.testing.assert_close(ca, expected)
    # a fresh field's colour is still grey (the shift starts at a tenth of its default scale, zero bias)
    fresh = FIELDS.build(name, hidden_dim=8, latent_dim=3, latent_mode="colour", **kwargs)
    assert ((fresh(p, a)[1] - 0.5).abs() < 0.05).all()
    with pytest.raises(ValueError, match="latent_mode"):
        FIELDS.build(name, latent_mode="density", **kwargs)

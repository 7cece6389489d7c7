"""att3d.train.grow: a trained model grown by finer grid levels computes the same function, then learns with them;
``att3d train init_from=MODEL grow_levels=[R]`` trains, records and resumes the grown model."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_config

import att3d
from att3d.cli.train import main as train_main
from att3d.model import AmortizedModel
from att3d.train.grow import grow_levels
from att3d.utils.errors import Att3dError
from att3d.world.prior_training import PriorArchitecture, build_scheduler, build_unet, save_prior

PROMPTS = ["a red cube", "a blue sphere", "a green torus"]


def _trained_like(seed: int = 0) -> AmortizedModel:
    """The tiny model with every weight moved off its initialisation (as a trained one is)."""
    torch.manual_seed(seed)
    cfg = tiny_config()
    cfg["field"]["latent_dim"] = 4
    model = AmortizedModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _outputs(model: AmortizedModel, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.field(points, model.conditioning(PROMPTS))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_grown_model_computes_the_same_function(mode):
    model = _trained_like()
    getattr(model, mode)()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    grown = grow_levels(model, [16, 32])
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random stream is left alone
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the source is left as it was
    assert grown.field.resolutions == [4, 8, 16, 32] and grown.config["field"]["resolutions"] == [4, 8, 16, 32]
    assert grown.training == model.training
    assert grown.mapping.out_dim == model.mapping.out_dim + 2 * (16**3 + 32**3)
    points = torch.rand(len(PROMPTS), 500, 3) * 2 - 1
    (d0, c0), (d1, c1) = _outputs(model, points), _outputs(grown, points)
    assert d0.abs().max() > 1  # a field with something in it
    torch.testing.assert_close(d1, d0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c1, c0, rtol=1e-4, atol=1e-5)
    # the new levels start at 0: the grid's old values are the old model's
    old, new = model.conditioning(PROMPTS)["grid"], grown.conditioning(PROMPTS)["grid"]
    torch.testing.assert_close(new[:, :old.shape[1]], old, rtol=1e-4, atol=1e-6)
    assert new[:, old.shape[1]:].abs().max() == 0


def test_the_new_levels_learn():
    """A few steps of fitting a target that only the finer level can draw move the new rows and lower the loss."""
    model = _trained_like()
    grown = grow_levels(model, [16]).train()
    points = torch.rand(len(PROMPTS), 2000, 3) * 2 - 1
    with torch.no_grad():
        target = grown.field(points, grown.conditioning(PROMPTS))[0] * (1 + 0.5 * torch.sin(20 * points[..., 0]))
    opt = torch.optim.Adam(grown.parameters(), lr=1e-2)
    n_old = model.mapping.out_dim - 4  # grid values of the old levels (the latent comes last)
    losses = []
    for _ in range(30):
        density = grown.field(points, grown.conditioning(PROMPTS))[0]
        loss = (density - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    new_rows = grown.conditioning(PROMPTS)["grid"][:, n_old:]
    assert new_rows.abs().max() > 1e-3


def test_grow_refuses_what_it_cannot_grow():
    model = _trained_like()
    with pytest.raises(Att3dError, match="must increase"):
        grow_levels(model, [8])  # not finer than the finest level
    with pytest.raises(Att3dError, match="must increase"):
        grow_levels(model, [32, 16])
    with pytest.raises(Att3dError, match="no resolutions"):
        grow_levels(model, [])
    cfg = tiny_config()
    cfg["mapping"] = {"name": "concat"}
    cfg["field"]["generated"] = False
    with pytest.raises(Att3dError, match="generated grid field and the hypernetwork"):
        grow_levels(AmortizedModel(cfg), [16])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("grow")
    _trained_like().save_pretrained(root / "model", extra={"steps": 7})
    arch = PriorArchitecture(block_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(0)
    save_prior(root / "prior", build_unet(arch), build_scheduler(arch), arch)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _argv(root, run, *extra: str, resume: bool = False) -> list[str]:
    return [f"init_from={root / 'model'}", "grow_levels=[16]", f"{'resume' if resume else 'run_dir'}={run}",
            "prompts=file", f"prompts.train={root / 'prompts.txt'}", f"guidance.prior.path={root / 'prior'}",
            "trainer.batch_size=2", "trainer.resolution=32", "trainer.device=cpu", "trainer.threads=1",
            "progress=false", "trainer.image_every=0", *extra]


def test_train_grows_records_and_resumes(files, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(_argv(files, run, "trainer.max_steps=2", "trainer.checkpoint_every=2")) == 0
    assert train_main(_argv(files, run, "trainer.max_steps=3", resume=True)) == 0  # resumes at step 2
    folder = run / "model"
    config = json.loads((folder / "model_config.json").read_text())
    assert config["field"]["resolutions"] == [4, 8, 16] and config["extra"]["grown_levels"] == [16]
    assert config["extra"]["previous"] == {"steps": 7} and config["extra"]["steps"] == 3
    model = att3d.load(folder)
    assert model.field.resolutions == [4, 8, 16]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 3 and all(r["grad_norm"] > 0 for r in rows)


@pytest.mark.parametrize("args, words", [
    (["grow_levels=64"], "grow_levels must be a list of resolutions"),
    (["grow_levels=[8]"], "must increase from above the finest level"),
])
def test_bad_grow_options_are_one_line(files, tmp_path, capsys, args, words):
    argv = [a for a in _argv(files, tmp_path / "run", "trainer.max_steps=1") if not a.startswith("grow_levels")]
    assert train_main([*argv, *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_grow_needs_init_from(files, tmp_path, capsys):
    argv = [a for a in _argv(files, tmp_path / "run", "trainer.max_steps=1") if not a.startswith("init_from")]
    assert train_main(argv) == 2
    assert "give init_from=" in capsys.readouterr().err

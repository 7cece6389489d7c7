"""The amortized SDS trainer on a tiny setup: checkpoints, reproducibility, exact resume, interpolation mixing.

Everything runs on the CPU in a few seconds: a tiny random shapes prior, a 4^3..8^3 grid field, 16x16 renders,
batches of 4 prompts. Runs use ``trainer.threads=1`` so that float reductions are bit-reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from att3d.config import build_trainer
from att3d.config import compose as compose_config
from att3d.render.cameras import OrbitCameras
from att3d.train import distributed
from att3d.train.trainer import Trainer

PROMPTS = ["a red cube", "a blue sphere", "a green torus", "a yellow cone", "a purple cylinder", "a pink capsule"]


@pytest.fixture(scope="module")
def prior_dir(tiny_prior_dir) -> Path:
    return tiny_prior_dir


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def tiny_overrides(prior_dir: Path, prompts_file: Path, run_dir: Path, **extra: object) -> list[str]:
    """Hydra overrides of a run that takes a fraction of a second per step on a CPU."""
    values: dict[str, object] = {
        "name": "test", "prompts": "file", "prompts.train": str(prompts_file), "guidance.prior.path": str(prior_dir),
        "field.base_resolution": 4, "field.max_resolution": 8, "field.hidden_dim": 8, "mapping.hidden_dim": 16,
        "renderer.num_samples": 12, "trainer.resolution": 16, "trainer.batch_size": 4, "trainer.max_steps": 4,
        "trainer.checkpoint_every": 2, "trainer.log_every": 1, "trainer.image_every": 0, "trainer.threads": 1,
        "trainer.device": "cpu", "progress": "false", "run_dir": str(run_dir),
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def compose(overrides: list[str]) -> dict:
    """The resolved ``att3d train`` config (a plain dict), as the Hydra app composes it."""
    return compose_config("train", overrides)


def make_trainer(prior_dir: Path, prompts_file: Path, run_dir: Path, resume: bool = True, **extra: object) -> Trainer:
    cfg = compose(tiny_overrides(prior_dir, prompts_file, run_dir, **extra))
    return build_trainer(cfg, run_dir, resume=resume)


def weights(trainer_or_folder: Trainer | Path) -> dict[str, torch.Tensor]:
    if isinstance(trainer_or_folder, Trainer):
        return {k: v.detach().clone() for k, v in trainer_or_folder.model.state_dict().items()}
    from safetensors.torch import load_file

    return load_file(str(Path(trainer_or_folder) / "model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k].float() - b[k].float()).abs().max().item():.3g}"


def test_checkpoint_round_trip(prior_dir, prompts_file, tmp_path):
    tr = make_trainer(prior_dir, prompts_file, tmp_path / "run", trainer__max_steps=3)
    for _ in range(3):
        assert "skipped" not in tr.train_step()
    folder = tr.save_checkpoint()
    assert folder.name == "step-0000003"
    assert json.loads((tr.ckpt_dir / "latest.json").read_text()) == {"folder": "step-0000003", "step": 3}
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "model_config.json", "optimizer.pt",
                                                  "rng.safetensors", "trainer_state.json"}
    other = make_trainer(prior_dir, prompts_file, tmp_path / "run", resume=False, trainer__max_steps=3)
    assert not torch.equal(weights(other)["field.mlp.0.weight"], weights(tr)["field.mlp.0.weight"])
    other.load_checkpoint(folder)
    assert_identical(weights(other), weights(tr))
    assert other.step == 3 and other.bad_steps == 0 and other._order == tr._order
    assert torch.equal(other.generator.get_state(), tr.generator.get_state())
    sa, sb = tr.optimizer.state_dict(), other.optimizer.state_dict()
    for pid, st in sa["state"].items():
        for key, value in st.items():
            assert torch.equal(value, sb["state"][pid][key])
    # The next step is the same on both.
    tr.train_step()
    other.train_step()
    assert_identical(weights(other), weights(tr))


def test_fixed_seed_is_bit_reproducible(prior_dir, prompts_file, tmp_path):
    a = make_trainer(prior_dir, prompts_file, tmp_path / "a", trainer__max_steps=3, trainer__checkpoint_every=100)
    b = make_trainer(prior_dir, prompts_file, tmp_path / "b", trainer__max_steps=3, trainer__checkpoint_every=100)
    c = make_trainer(prior_dir, prompts_file, tmp_path / "c", trainer__max_steps=3, trainer__checkpoint_every=100,
                     trainer__seed=1)
    assert_identical(weights(a), weights(b))  # the initial weights depend on the seed only
    wa, wb, wc = (weights(t.fit()) for t in (a, b, c))
    assert_identical(wa, wb)
    assert not torch.equal(wa["mapping.fc1.parametrizations.weight.original"],
                           wc["mapping.fc1.parametrizations.weight.original"])
    # the run changed the weights, and its logged history is identical too
    assert not torch.equal(wa["field.mlp.0.weight"], weights(make_trainer(prior_dir, prompts_file, tmp_path / "d"))[
        "field.mlp.0.weight"])
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [1, 2, 3]
    assert [(r["loss"], r["grad_norm"]) for r in la] == [(r["loss"], r["grad_norm"]) for r in lb]


def test_the_final_model_records_its_teacher(prior_dir, prompts_file, tmp_path):
    tr = make_trainer(prior_dir, prompts_file, tmp_path / "run", trainer__max_steps=1, guidance__guidance_scale=2.5)
    extra = json.loads((tr.fit() / "model_config.json").read_text())["extra"]
    assert extra["stage"] == "nerf" and extra["steps"] == 1
    teacher = extra["teacher"]
    assert teacher["prior"]["path"] == str(prior_dir) and teacher["prior"]["name"] == "shapes"
    assert teacher["method"] == "sds" and teacher["guidance_scale"] == 2.5
    assert teacher["t_range"] == list(tr.guidance.t_range) and "weighting" in teacher  # resolved, defaults included


def test_resume_is_exact(prior_dir, prompts_file, tmp_path):
    full = make_trainer(prior_dir, prompts_file, tmp_path / "full", trainer__max_steps=6, trainer__checkpoint_every=3)
    reference = weights(full.fit())
    half = make_trainer(prior_dir, prompts_file, tmp_path / "half", trainer__max_steps=3, trainer__checkpoint_every=3)
    half.fit()
    assert half.step == 3
    resumed = make_trainer(prior_dir, prompts_file, tmp_path / "half", trainer__max_steps=6,
                           trainer__checkpoint_every=3)
    final = resumed.fit(resume=True)
    assert resumed.step == 6
    assert_identical(weights(final), reference)
    steps = [json.loads(x)["step"] for x in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # keep_checkpoints=2: the two newest folders stay
    assert sorted(p.name for p in (tmp_path / "half" / "checkpoints").glob("step-*")) == ["step-0000003",
                                                                                            "step-0000006"]


def test_resume_false_starts_over(prior_dir, prompts_file, tmp_path):
    tr = make_trainer(prior_dir, prompts_file, tmp_path / "run", trainer__max_steps=2)
    tr.fit()
    fresh = weights(make_trainer(prior_dir, prompts_file, tmp_path / "fresh", trainer__max_steps=2))
    again = make_trainer(prior_dir, prompts_file, tmp_path / "run", resume=False, trainer__max_steps=2)
    assert again.restore(resume=False) is None and again.step == 0
    assert_identical(weights(again), fresh)
    # with resume (the default), building the trainer checks the checkpoint against (a copy of) the model, and
    # restore() loads it
    resumed = make_trainer(prior_dir, prompts_file, tmp_path / "run", trainer__max_steps=2)
    assert_identical(weights(resumed), fresh)
    assert resumed.restore() is not None and resumed.step == 2
    assert_identical(weights(resumed), weights(tmp_path / "run" / "checkpoints" / "step-0000002"))


def test_interpolation_mixing_path(prior_dir, prompts_file, tmp_path):
    tr = make_trainer(prior_dir, prompts_file, tmp_path / "run", trainer__interpolation__prob=0.5,
                      trainer__interpolation__kappa=1.0, trainer__max_steps=2)
    batch = tr.sample_batch()
    assert batch.n_mix == 2 and len(batch.emb) == 4 and len(batch.cond) == 4 and len(batch.cameras) == 4
    emb, idx, w, partner = tr.text_emb, batch.idx, batch.mix_weight, batch.mix_partner
    assert w.shape == partner.shape == (2,) and bool(((w > 0) & (w < 1)).all())
    expected = w[:, None, None] * emb.tokens[idx[:2]] + (1 - w)[:, None, None] * emb.tokens[partner]
    torch.testing.assert_close(batch.emb.tokens[:2], expected)
    assert torch.equal(batch.emb.tokens[2:], emb.tokens[idx[2:]])  # the other rows are plain prompts
    c = batch.cond
    expected_cond = tr.prior_cond.index(idx[:2]).mix(tr.prior_cond.index(partner), w)
    torch.testing.assert_close(c.index(slice(0, 2)).cond, expected_cond.cond)
    before = weights(tr)
    final = tr.fit()
    after = weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and torch.isfinite(torch.tensor(record["loss"]))


def test_sds_draws_match_internal_draws(prior_dir, prompts_file, tmp_path):
    """The trainer's global-batch draws of t and noise are what the SDS would draw itself (one process)."""
    tr = make_trainer(prior_dir, prompts_file, tmp_path / "run")
    images = torch.rand(4, 3, 16, 16, requires_grad=True)
    cond = tr.prior_cond.index(torch.arange(4))
    cams = OrbitCameras.evaluation(4)
    tr.generator.manual_seed(5)
    t, noise = tr.sds_random(slice(0, 4))
    own = tr.guidance(images, cond, cams, step=0, generator=torch.Generator().manual_seed(5))
    given = tr.guidance(images, cond, cams, step=0, t=t, noise=noise)
    assert torch.equal(own.t, given.t)
    torch.testing.assert_close(own.loss, given.loss, rtol=0, atol=0)


def test_batch_must_split_over_processes():
    with pytest.raises(distributed.DistributedError, match="batch_size=6 does not split evenly over 4 processes"):
        distributed.shard(6, distributed.DistInfo(rank=1, world_size=4))
    assert distributed.shard(8, distributed.DistInfo(rank=1, world_size=4)) == slice(2, 4)


def test_the_trainer_locks_its_run_folder_while_it_writes(prior_dir, prompts_file, tmp_path):
    from att3d.train.run_dir import RunDirLocked, holds_lock

    run_dir = tmp_path / "run"
    tr = make_trainer(prior_dir, prompts_file, run_dir, trainer__max_steps=2)
    seen = []

    class Probe:
        def on_step(self, trainer, stats):
            seen.append(holds_lock(run_dir))

    tr.callbacks.append(Probe())
    tr.fit()
    assert seen == [True, True] and not holds_lock(run_dir)  # held while training, released at the end
    import subprocess
    import sys

    hold = "import sys, time; from att3d.train.run_dir import lock_run_dir; held = lock_run_dir(sys.argv[1]); " \
           "print('locked', flush=True); time.sleep(600)"
    other = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        again = make_trainer(prior_dir, prompts_file, run_dir, trainer__max_steps=4)
        with pytest.raises(RunDirLocked, match=f"run folder {run_dir} is in use by another att3d run"):
            again.fit()
        assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 2  # untouched
    finally:
        other.kill()
        other.wait()


def test_pruning_keeps_later_complete_checkpoints_and_removes_leftovers(prior_dir, prompts_file, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    tr = make_trainer(prior_dir, prompts_file, run_dir, trainer__max_steps=2, trainer__keep_checkpoints=1)
    tr.fit()
    ckpt = run_dir / "checkpoints"
    later = ckpt / "step-0000008"  # a complete checkpoint of a later step (the run was rolled back on purpose)
    shutil.copytree(ckpt / "step-0000002", later)
    state = json.loads((later / "trainer_state.json").read_text())
    (later / "trainer_state.json").write_text(json.dumps({**state, "step": 8}))
    (ckpt / ".step-0000004.tmp-0a1b").mkdir()  # the remains of a write that a crash interrupted
    (ckpt / "step-0000003").mkdir()  # an incomplete folder (a version that wrote in place)
    resumed = make_trainer(prior_dir, prompts_file, run_dir, trainer__max_steps=4, trainer__keep_checkpoints=1,
                           resume_checkpoint="step-0000002")
    assert resumed.restore() == ckpt / "step-0000002" and resumed.step == 2
    resumed.fit()
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest.json", "step-0000004", "step-0000008"]


def test_mapping_lr_scale_gives_the_mapping_its_own_rate(prior_dir, prompts_file, tmp_path):
    plain = make_trainer(prior_dir, prompts_file, tmp_path / "plain", trainer__max_steps=2)
    assert len(plain.optimizer.param_groups) == 1
    scaled = make_trainer(prior_dir, prompts_file, tmp_path / "scaled", trainer__max_steps=2,
                          trainer__mapping_lr_scale=0.25, trainer__warmup_steps=0)
    field_group, mapping_group = scaled.optimizer.param_groups
    mapping = {id(p) for p in scaled.model.mapping.parameters()}
    assert {id(p) for p in mapping_group["params"]} == mapping and not mapping & {id(p) for p in field_group["params"]}
    assert mapping_group["lr"] == pytest.approx(0.25 * field_group["lr"])
    before = weights(scaled)
    scaled.train_step()
    after = weights(scaled)
    assert not torch.equal(before["field.mlp.0.weight"], after["field.mlp.0.weight"])
    # resume keeps the two groups and their rates
    folder = scaled.save_checkpoint()
    again = make_trainer(prior_dir, prompts_file, tmp_path / "scaled", resume=False, trainer__max_steps=2,
                         trainer__mapping_lr_scale=0.25, trainer__warmup_steps=0)
    again.load_checkpoint(folder)
    assert [g["lr"] for g in again.optimizer.param_groups] == [g["lr"] for g in scaled.optimizer.param_groups]
    from att3d.train.trainer import trainer_config_from_dict
    from att3d.utils.errors import Att3dError

    with pytest.raises(Att3dError, match="trainer.mapping_lr_scale must be greater than 0"):
        trainer_config_from_dict({"mapping_lr_scale": 0})


def test_polish_experiment_is_shapes64_on_the_low_noise_steps_from_a_trained_model():
    """experiment=shapes64_polish: the shapes64 recipe (prompts, batch, lr) from a trained model's weights, with
    score distillation on t <= 0.5 T only, at guidance 2, and the learning rate decaying to 10%."""
    base, polish = compose(["experiment=shapes64"]), compose(["experiment=shapes64_polish"])
    assert polish["init_from"] == "assets/att3d-shapes64" and base["init_from"] is None
    assert polish["prompts"] == base["prompts"] and polish["trainer"]["batch_size"] == base["trainer"]["batch_size"]
    g = polish["guidance"]
    assert (g["guidance_scale"], g["guidance_scale_low"], list(g["t_range"])) == (2.0, None, [0.02, 0.5])
    assert (base["guidance"]["guidance_scale"], list(base["guidance"]["t_range"])) == (5.0, [0.02, 0.98])
    assert polish["trainer"]["lr_final"] == 0.1 and polish["trainer"]["max_steps"] == 1000
    assert compose(["experiment=shapes64_polish", "init_from=runs/x/model"])["init_from"] == "runs/x/model"


def test_unguided_experiment_is_shapes64_over_all_timesteps_at_guidance_one():
    """experiment=shapes64_unguided (phase 3): the shapes64 recipe from a trained model, every timestep, guidance 1
    (the conditional score alone), the learning rate decaying to 10%; a guidance scale of 1 runs one prior branch."""
    base, unguided = compose(["experiment=shapes64"]), compose(["experiment=shapes64_unguided"])
    assert unguided["init_from"] == "assets/att3d-shapes64" and unguided["name"] == "shapes64_unguided"
    assert unguided["prompts"] == base["prompts"] and unguided["trainer"]["batch_size"] == base["trainer"]["batch_size"]
    g = unguided["guidance"]
    assert (g["guidance_scale"], g["guidance_scale_low"], list(g["t_range"])) == (1.0, None, [0.02, 0.98])
    assert unguided["trainer"]["lr_final"] == 0.1 and unguided["trainer"]["max_steps"] == 1000


def test_mesh_experiment_is_the_mesh_stage_in_geometry_mode_at_guidance_one():
    """experiment=shapes64_mesh (the shipped model's last phase): the mesh stage on the shapes64 prompts, geometry
    refined through 64^3 DMTet surfaces rendered at 64 px, the unguided score, the stage's smaller learning rate
    decaying to 10%; it needs the model it refines (init_from)."""
    base = compose(["experiment=shapes64"])
    mesh = compose(["experiment=shapes64_mesh", "init_from=runs/x/model"])
    assert mesh["init_from"] == "runs/x/model" and mesh["name"] == "shapes64_mesh"
    assert mesh["prompts"] == base["prompts"] and mesh["trainer"]["batch_size"] == base["trainer"]["batch_size"]
    assert mesh["stage"]["geometry"] is True and mesh["stage"]["tet_resolution"] == 64
    assert "tet_resolution" not in base["stage"]  # the experiment switched the stage, not just its settings
    g = mesh["guidance"]
    assert (g["guidance_scale"], g["guidance_scale_low"], list(g["t_range"])) == (1.0, None, [0.02, 0.98])
    t = mesh["trainer"]
    assert (t["resolution"], t["lr"], t["lr_final"], t["max_steps"]) == (64, 3.0e-4, 0.1, 400)


def test_adam_is_fused_on_a_cpu_and_steps_like_the_default_one():
    # the fused step: the same update (to float rounding) and state; an unfused run's state resumes in it
    from att3d.train.optim import adam

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(300, generator=g), torch.randn(7, 5, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(6)]
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 1e-3}

    def run(make, resume_at=None):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make(params)
        for n, step in enumerate(grads):
            if n == resume_at:  # continue from this optimizer's state in a fused one
                state = opt.state_dict()
                opt = adam(params, **kw)
                opt.load_state_dict(state)
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
        return opt, torch.cat([p.detach().flatten() for p in params])

    fused, a = run(lambda ps: adam(ps, **kw))
    assert fused.defaults["fused"] is True
    plain, b = run(lambda ps: torch.optim.Adam(ps, **kw))
    _, c = run(lambda ps: torch.optim.Adam(ps, **kw), resume_at=3)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(a, torch.cat([t.flatten() for t in start]))
    assert fused.state_dict()["state"].keys() == plain.state_dict()["state"].keys()

"""Test-time refinement: works on a copy, changes the copy, runs SDS with a tiny prior, from-scratch baseline, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import tiny_config

import att3d
from att3d import cli
from att3d.cli import refine as cli_refine
from att3d.eval import refine_eval
from att3d.guidance import ScoreDistillation, ShapesPrior
from att3d.model import AmortizedModel
from att3d.train import refine as rf

TINY_CONFIG = tiny_config()
PROMPT = "a red sphere"
FAST = {"resolution": 16, "batch_views": 2, "progress": False}


@pytest.fixture(scope="module")
def model() -> AmortizedModel:
    torch.manual_seed(0)
    return AmortizedModel(TINY_CONFIG).eval()


@pytest.fixture(scope="module")
def prior_folder(tiny_prior_dir):
    return tiny_prior_dir


@pytest.fixture(scope="module")
def guidance(prior_folder, model) -> ScoreDistillation:
    from att3d.utils.checkpoint import load_json

    tiny = ShapesPrior.from_pretrained(prior_folder)
    # share the model's MiniLM instead of keeping a second copy alive
    prior = ShapesPrior(tiny.unet, tiny.scheduler, model.text_encoder, load_json(prior_folder / "prior_config.json")
                        ["arch"])
    return ScoreDistillation(prior, guidance_scale=5.0)


def _snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = m.state_dict()
    assert set(now) == set(snap)
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"{k} of the original model changed"


def _changed(a: torch.nn.Module, b: torch.nn.Module, prefix: str) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))


def test_refine_params_changes_only_the_copy(model, guidance):
    snap = _snapshot(model)
    calls: list[int] = []

    def eval_fn(m) -> dict[str, float]:
        calls.append(1)
        assert not m.training and not torch.is_grad_enabled()
        return {"mean_grid": float(m.conditioning([PROMPT])["grid"].mean())}

    refined, hist = rf.refine(model, PROMPT, 3, guidance, mode="params", eval_fn=eval_fn, eval_every=2, **FAST)
    _assert_unchanged(model, snap)
    assert isinstance(refined, rf.RefinedModel) and refined.model is not model
    assert refined.text_encoder is model.text_encoder  # the frozen encoder is shared, not copied
    # the refined prompt's conditioning and the field MLP moved; the mapping did not
    with torch.no_grad():
        before = model.conditioning([PROMPT])["grid"]
        after = refined.conditioning([" a  red sphere "])["grid"]
        assert (after - before).abs().max() > 1e-4
        assert _changed(refined.model, model, "field.")
        assert not _changed(refined.model, model, "mapping.")
        other = refined.conditioning(["a blue cube", PROMPT])["grid"]
        torch.testing.assert_close(other[0], model.conditioning(["a blue cube"])["grid"][0])
        torch.testing.assert_close(other[1], after[0])
    # history: one record per step, evaluations at 0, 2 and 3, all finite
    assert [r["step"] for r in hist.train] == [1, 2, 3] and hist.finite()
    assert [r["step"] for r in hist.evals] == [0, 2, 3] and len(calls) == 3
    assert hist.evals[0]["mean_grid"] != hist.evals[-1]["mean_grid"]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in hist.train)
    assert not any(p.requires_grad for p in refined.parameters())
    json.dumps(hist.to_dict())


def test_refine_is_reproducible_and_freeze_field(model, guidance):
    a, ha = rf.refine(model, PROMPT, 2, guidance, seed=3, train_field=False, **FAST)
    b, hb = rf.refine(model, PROMPT, 2, guidance, seed=3, train_field=False, **FAST)
    assert [r["loss"] for r in ha.train] == [r["loss"] for r in hb.train]
    assert torch.equal(a.refined["grid"], b.refined["grid"])
    assert not _changed(a.model, model, "")  # frozen field, untouched mapping: only the conditioning moved


def test_cosine_lr_factor_and_t_max_window(model, guidance, monkeypatch):
    from att3d.train.optim import lr_factor

    assert lr_factor(0, 10, lr_final=0.1) == 1.0
    assert lr_factor(9, 10, lr_final=0.1) == pytest.approx(0.1)
    assert 0.1 < lr_factor(5, 10, lr_final=0.1) < 1.0
    assert lr_factor(9, 10, lr_final=1.0) == 1.0 and lr_factor(0, 1, lr_final=0.1) == 1.0
    assert [lr_factor(s, 10, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    seen_t, seen_lr = [], []
    real_call = type(guidance).__call__

    def spy(self, images, cond, cameras=None, step=0, generator=None, **kw):
        out = real_call(self, images, cond, cameras, step=step, generator=generator, **kw)
        seen_t.append(out.t.detach().clone())
        return out

    real_step = torch.optim.Adam.step

    def spy_step(self, *a, **kw):
        seen_lr.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(type(guidance), "__call__", spy)
    monkeypatch.setattr(torch.optim.Adam, "step", spy_step)
    before = (guidance.t_range, guidance.t_anneal, guidance.per_item_t)
    rf.refine(model, PROMPT, 4, guidance, t_max=0.3, lr=1e-2, lr_final=0.1, **FAST)
    t = torch.cat(seen_t)
    assert int(t.max()) <= round(0.3 * guidance.prior.num_train_timesteps)
    assert all(len(set(step_t.tolist())) == 1 for step_t in seen_t)  # shared_t: one timestep per step
    assert (guidance.t_range, guidance.t_anneal, guidance.per_item_t) == before  # the caller's is not modified
    assert seen_lr[0] == pytest.approx(1e-2) and seen_lr[-1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(seen_lr, seen_lr[1:]))
    seen_t.clear()
    rf.refine(model, PROMPT, 3, guidance, shared_t=False, seed=1, **{**FAST, "batch_views": 4})
    assert any(len(set(step_t.tolist())) > 1 for step_t in seen_t)  # one timestep per view
    for bad in ({"lr_final": 0.0}, {"t_max": 1.5}, {"mode": "nope"}):
        with pytest.raises(rf.Att3dError):
            rf.refine(model, PROMPT, 1, guidance, **bad, **FAST)


def test_refine_schedule_precedence(tmp_path):
    shapes = cli_refine.refine_schedule("shapes")  # the shipped config's refine block
    assert shapes == {"guidance_scale": 5.0, "guidance_scale_low": 2.0, "low_t": 0.5, "t_max": None, "lr_final": 0.1}
    assert cli_refine.refine_schedule("shapes", from_scratch=True) == {
        "guidance_scale": None, "guidance_scale_low": None, "low_t": None, "t_max": None, "lr_final": 1.0}
    assert cli_refine.refine_schedule("shapes", overrides={"t_max": 0.3, "guidance_scale": None})["t_max"] == 0.3
    assert cli_refine.refine_schedule("stable_diffusion")["t_max"] is None  # no refine block: the config's own schedule
    bad = tmp_path / "bad.yaml"
    bad.write_text("prior: {name: shapes, path: x}\nrefine: {guidance: 2}\n")
    with pytest.raises(rf.Att3dError, match="unknown keys"):
        cli_refine.refine_schedule(str(bad))


def test_refine_model_mode_trains_a_copy_of_the_whole_model(model, guidance):
    snap = _snapshot(model)
    refined, hist = rf.refine(model, PROMPT, 2, guidance, mode="model", **FAST)
    _assert_unchanged(model, snap)
    assert refined.refined is None and len(hist.train) == 2 and hist.finite()
    assert _changed(refined.model, model, "mapping.") and _changed(refined.model, model, "field.")
    with torch.no_grad():
        assert not torch.allclose(refined.conditioning([PROMPT])["grid"], model.conditioning([PROMPT])["grid"])


def test_from_scratch_is_a_new_initialisation(model, guidance):
    snap = _snapshot(model)
    fresh = rf.fresh_model(model, seed=0)
    assert fresh.config == model.config and fresh.text_encoder is model.text_encoder
    assert _changed(fresh, model, "mapping.") and _changed(fresh, model, "field.")
    again = rf.fresh_model(model, seed=0)
    assert not _changed(fresh, again, "")  # seeded
    state = torch.random.get_rng_state()
    scratch, hist = rf.from_scratch(model, PROMPT, 2, guidance, **FAST)
    assert torch.equal(torch.random.get_rng_state(), state)  # the fresh init draws from a forked RNG
    _assert_unchanged(model, snap)
    assert hist.config["from_scratch"] is True and len(hist.train) == 2 and hist.finite()
    assert hist.config["guidance_scale"] == guidance.guidance_scale  # the SDS schedule is recorded
    with torch.no_grad():
        start = fresh.conditioning([PROMPT])["grid"]
        assert not torch.allclose(scratch.conditioning([PROMPT])["grid"], start)
        assert not torch.allclose(start, model.conditioning([PROMPT])["grid"])
    with pytest.raises(TypeError):
        rf.from_scratch(model, PROMPT, 1, guidance, bogus=1)


def test_refined_model_saves_and_loads(model, guidance, tmp_path):
    refined, _ = rf.refine(model, PROMPT, 1, guidance, **FAST)
    folder = refined.save_pretrained(tmp_path / "refined")
    assert (folder / rf.REFINED_NAME).is_file()
    back = rf.load_refined(folder)
    assert back.prompt == PROMPT and back.info["mode"] == "params"
    with torch.no_grad():
        torch.testing.assert_close(back.conditioning([PROMPT])["grid"], refined.conditioning([PROMPT])["grid"],
                                   rtol=0, atol=0)
    plain = att3d.load(folder)  # still an ordinary model folder
    assert not _changed(plain, refined.model, "")
    with pytest.raises(att3d.utils.errors.Att3dError):
        rf.load_refined(model.save_pretrained(tmp_path / "plain"))


def test_shapes_eval_fn_scores_against_the_ground_truth(model):
    fn = refine_eval.shapes_eval_fn(PROMPT, resolution=16)
    scores = fn(model)
    assert set(scores) == {"volume_iou", "silhouette_iou", "colour_error"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert refine_eval.is_shapes_caption(PROMPT) and not refine_eval.is_shapes_caption("a dragon")


def test_cli_refine(model, prior_folder, tmp_path, capsys):
    ckpt = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "refined"
    args = ["refine", PROMPT, "--steps", "2", "--out", str(out), "--checkpoint", str(ckpt), "--prior",
            str(prior_folder), "--resolution", "16", "--batch-views", "2", "--device", "cpu",
            "--grid-resolution", "16", "--texture-size", "64", "--format", "ply", "--no-turntable",
            "--threshold", "1.0"]
    pytest.importorskip("att3d.infer.generate", reason="exports need att3d.infer.generate")
    rc = cli.main(args)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["train"]) == 2 and [e["step"] for e in hist["evals"]] == [0, 2]
    assert "volume_iou" in hist["evals"][0]
    back = rf.load_refined(out / "model")
    assert back.prompt == PROMPT
    written = [Path(line[len("wrote "):]) for line in printed.splitlines() if line.startswith("wrote ")
               and " and " not in line]
    assert written and all(p.exists() for p in written)
    assert any(p.suffix == ".ply" for p in written)


def test_cli_refine_user_errors(model, prior_folder, tmp_path, capsys):
    ckpt = model.save_pretrained(tmp_path / "model")
    assert cli.main(["refine", PROMPT, "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert cli.main(["refine", PROMPT, "--checkpoint", str(ckpt), "--guidance", "nope"]) == 2
    assert "unknown guidance" in capsys.readouterr().err
    assert cli.main(["refine", PROMPT, "--checkpoint", str(ckpt), "--prior", str(tmp_path / "none"),
                     "--device", "cpu"]) == 2
    assert "no shapes prior" in capsys.readouterr().err

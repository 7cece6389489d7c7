"""End to end: `att3d train` with the shipped shapes prior learns objects that match their own prompts.

The one test of the suite that trains for minutes: 4 prompts, a few hundred amortized SDS steps on the
CPU, then each learned object is compared with the ground truth of all 4 prompts at the evaluation views.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import att3d
from att3d.eval.model_eval import render_views
from att3d.world import metrics
from att3d.world.shapes import parse_caption

REPO = Path(__file__).resolve().parents[1]
PRIOR = Path(os.environ.get("ATT3D_TEST_PRIOR", REPO / "assets" / "shapes-prior"))
PROMPTS = ["a red cube", "a blue sphere", "a green torus", "a yellow cone"]


@pytest.mark.slow
def test_amortized_training_learns_each_prompt(tmp_path):
    from att3d.cli.train import main

    code = main([
        "experiment=quickstart", f"prompts.train=[{','.join(PROMPTS)}]", f"guidance.prior.path={PRIOR}",
        "trainer.max_steps=300", "trainer.batch_size=4", "trainer.checkpoint_every=300", "trainer.log_every=50",
        "trainer.image_every=0", "trainer.seed=0", "progress=false", f"run_dir={tmp_path}",
    ])
    assert code == 0
    model = att3d.load(tmp_path / "model")
    with torch.no_grad():
        rgb, opacity = render_views(model, model.conditioning(PROMPTS), resolution=32)
    gt = metrics.ground_truth_views([parse_caption(p) for p in PROMPTS], 32, 8)
    n = len(PROMPTS)
    sil = torch.zeros(n, n)
    col = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            sil[i, j] = metrics.silhouette_iou(opacity[i], gt["mask"][j]).mean()
            col[i, j] = metrics.colour_error(rgb[i].reshape(1, -1, 32, 3), gt["rgb"][j].reshape(1, -1, 32, 3),
                                             opacity[i].reshape(1, -1, 32), gt["mask"][j].reshape(1, -1, 32))[0]
    # Each learned object is closer to its own prompt than to any other, in colour and in silhouette.
    assert torch.equal(col.argmin(dim=1), torch.arange(n)), f"colour error matrix:\n{col}"
    assert torch.equal(sil.argmax(dim=1), torch.arange(n)), f"silhouette IoU matrix:\n{sil}"
    assert sil.diagonal().mean() > 0.6 and col.diagonal().mean() < 0.2

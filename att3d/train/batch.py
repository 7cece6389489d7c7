"""What one training step sees: prompts (and mixtures of two), their embeddings, the prior's conditioning, and
cameras, several views per prompt where a prior wants them.

Everything random is drawn from the trainer's one seeded generator for the step's *global* batch and then
sliced to the rows of this rank (:mod:`att3d.train.distributed`), so a fixed seed reproduces a run on the
CPU, a resumed run continues exactly as an uninterrupted one, and N processes train the model that one
process would with the whole batch.

Rows of a batch are prompt-major: with ``P`` prompts and ``V`` views per prompt, row ``p * V + v`` is view
``v`` of prompt ``p`` (a multi-view prior such as MVDream reads the ``V`` consecutive rows of a prompt as
one object).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from att3d.render.cameras import DEFAULT_FOV_DEG, DEFAULT_RADIUS, OrbitCameras
from att3d.text.encoders import TextEmbedding
from att3d.utils.errors import Att3dError


@dataclass(frozen=True)
class CameraSampler:
    """Random training cameras on the orbit of the world (azimuth uniform, elevation uniform in a range).

    Args:
        elevation_deg: (low, high) elevation range in degrees.
        radius: distance of the eye from the origin.
        fov_deg: vertical field of view in degrees.
        views_per_prompt: V cameras per prompt in one step (1: ATT3D; 4: multi-view priors, refinement).
    """

    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    radius: float = DEFAULT_RADIUS
    fov_deg: float = DEFAULT_FOV_DEG
    views_per_prompt: int = 1

    def __post_init__(self) -> None:
        if int(self.views_per_prompt) < 1:
            raise Att3dError(f"views_per_prompt must be at least 1, got {self.views_per_prompt}")
        lo, hi = (float(e) for e in self.elevation_deg)
        if not -90.0 <= lo <= hi <= 90.0:
            raise Att3dError(f"elevation_deg must be (low, high) within [-90, 90], got {tuple(self.elevation_deg)}")
        if not (self.radius > 0 and 0 < self.fov_deg < 180):
            raise Att3dError(f"camera radius must be > 0 and fov_deg in (0, 180), got {self.radius}, {self.fov_deg}")

    def sample(self, prompts: int, generator: torch.Generator) -> OrbitCameras:
        """``prompts * views_per_prompt`` cameras, prompt-major (views of prompt p: rows p V .. p V + V - 1)."""
        return OrbitCameras.sample_training(prompts * int(self.views_per_prompt), generator,
                                            tuple(self.elevation_deg), self.radius, self.fov_deg)


def mix_embeddings(a: TextEmbedding, b: TextEmbedding, w: torch.Tensor) -> TextEmbedding:
    """Convex mixture ``w * a + (1 - w) * b`` of two batches of embeddings.

    Args:
        a, b: embeddings of B prompts (tokens (B, L, D), mask (B, L), pooled (B, D)).
        w: (B,) weights of ``a``.
    """
    wt = w.to(a.tokens)
    tokens = wt[:, None, None] * a.tokens + (1 - wt)[:, None, None] * b.tokens
    pooled = wt[:, None] * a.pooled + (1 - wt)[:, None] * b.pooled
    return TextEmbedding(tokens, a.mask | b.mask, pooled)


@dataclass
class Batch:
    """One step's rows on this rank.

    Attributes:
        idx: (P_r,) prompt indices of this rank's prompts (for a mixture: its first prompt).
        emb: text embeddings of the rows (P_r V rows), for the mapping network.
        cond: the prior's conditioning of the rows (P_r V rows).
        cameras: P_r V cameras.
        views: V, views per prompt.
        rows: this rank's slice of the global batch's prompts.
        n_mix: mixtures in the global batch (its first prompts).
        mix_partner: (n_mix,) their second prompts; mix_weight: (n_mix,) weights of their first prompts.
    """

    idx: torch.Tensor
    emb: TextEmbedding
    cond: object
    cameras: OrbitCameras
    views: int
    rows: slice
    n_mix: int
    mix_partner: torch.Tensor
    mix_weight: torch.Tensor

    @property
    def view_rows(self) -> slice:
        """This rank's slice of the global batch's rows (prompt-major, ``views`` rows per prompt)."""
        return slice(self.rows.start * self.views, self.rows.stop * self.views)


class BatchSampler:
    """Draws the prompts, mixtures and cameras of each step (the state that a checkpoint must keep: ``order``).

    Args:
        num_prompts: size of the prompt set.
        batch_size: prompts per step (global over the ranks).
        cameras: the camera sampler.
        interpolation_prob: fraction of the batch's prompts that are mixtures of two (ATT3D interpolation
            training); kappa: the Dirichlet concentration of their weights.
    """

    def __init__(self, num_prompts: int, batch_size: int, cameras: CameraSampler, interpolation_prob: float = 0.0,
                 kappa: float = 1.0):
        if num_prompts < 1:
            raise Att3dError("the prompt set is empty")
        if not 0.0 <= interpolation_prob <= 1.0:
            raise Att3dError(f"trainer.interpolation.prob must be in [0, 1], got {interpolation_prob}")
        if not kappa > 0:
            raise Att3dError(f"trainer.interpolation.kappa must be > 0, got {kappa}")
        self.num_prompts = int(num_prompts)
        self.batch_size = int(batch_size)
        self.cameras = cameras
        self.interpolation_prob = float(interpolation_prob)
        self.kappa = float(kappa)
        #: the rest of the current epoch's shuffled prompt order (popped from the end)
        self.order: list[int] = []

    def next_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of the next ``n`` prompts: epochs over a seeded shuffle, so every prompt is visited evenly."""
        out = []
        while len(out) < n:
            if not self.order:
                self.order = torch.randperm(self.num_prompts, generator=generator).tolist()
            out.append(self.order.pop())
        return torch.tensor(out)

    def sample(self, text_emb: TextEmbedding, prior_cond, generator: torch.Generator, rows: slice,
               device: torch.device) -> Batch:
        """The step's batch for this rank's ``rows`` of the global batch.

        Args:
            text_emb: embeddings of the whole prompt set (on ``device``).
            prior_cond: the prior's conditioning of the whole prompt set (``index``, ``mix``, ``cat``,
                ``repeat_interleave``).
            generator: the trainer's generator.
            rows: this rank's slice of the global batch's prompts.
        """
        n = self.batch_size
        idx = self.next_prompts(n, generator)
        emb = text_emb.index(idx.to(device))
        cond = prior_cond.index(idx)
        n_mix = int(round(self.interpolation_prob * n))
        partner, w = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        if n_mix > 0:
            partner = torch.randint(0, self.num_prompts, (n_mix,), generator=generator)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            w = torch.from_numpy(np.random.default_rng(seed).dirichlet([self.kappa, self.kappa], size=n_mix)[:, 0])
            w = w.float()
            head = torch.arange(n_mix)
            mixed = mix_embeddings(emb.index(head.to(device)), text_emb.index(partner.to(device)), w.to(device))
            emb = TextEmbedding(torch.cat([mixed.tokens, emb.tokens[n_mix:]]),
                                torch.cat([mixed.mask, emb.mask[n_mix:]]),
                                torch.cat([mixed.pooled, emb.pooled[n_mix:]]))
            mixed_cond = cond.index(head).mix(prior_cond.index(partner), w)
            cond = type(cond).cat([mixed_cond, cond.index(torch.arange(n_mix, len(idx)))])
        views = int(self.cameras.views_per_prompt)
        cams = self.cameras.sample(n, generator)
        emb, cond = emb.index(rows), cond.index(rows)
        if views > 1:
            emb = emb.index(torch.arange(len(idx[rows]), device=emb.tokens.device).repeat_interleave(views))
            cond = cond.repeat_interleave(views)
        batch = Batch(idx=idx[rows], emb=emb, cond=cond, cameras=cams, views=views, rows=rows, n_mix=n_mix,
                      mix_partner=partner, mix_weight=w)
        batch.cameras = cams.index(batch.view_rows).to(device)
        return batch

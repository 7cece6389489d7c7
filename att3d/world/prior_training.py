"""Training the embedded view-conditioned diffusion prior on renders of the shapes world.

The prior is a diffusers ``UNet2DConditionModel`` in pixel space that cross-attends
to the MiniLM token embeddings of the caption and takes the camera 4-vector
``(sin phi, cos phi, sin theta, cos theta)`` through its projection class embedding.
Captions are dropped (replaced by the empty prompt) with probability
``cond_drop`` for classifier-free guidance. Training data are rendered on the fly
by the ground-truth renderer at random training views, so the prior never sees the
same image twice. Training is resumable: ``out_dir/checkpoint/`` is written
atomically every ``checkpoint_every`` steps and picked up on restart.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from att3d.guidance.priors.shapes import unet_input
from att3d.render.cameras import (
    OrbitCameras,
    camera_feature_dim,
    camera_features,
    camera_map_channels,
)
from att3d.utils.checkpoint import (
    load_json,
    load_state,
    load_tensors,
    rng_state,
    save_json,
    save_state,
    save_tensors,
    set_rng_state,
)
from att3d.world.render import render_objects
from att3d.world.shapes import all_objects

log = logging.getLogger(__name__)


@dataclass
class PriorArchitecture:
    """Shape of the prior's UNet and noise schedule."""

    resolution: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 32
    norm_num_groups: int = 16
    text_encoder: str = "minilm"
    text_max_length: int = 16
    cross_attention_dim: int = 384
    camera_dim: int = 4
    #: Azimuth harmonics of the camera input (:func:`att3d.render.cameras.camera_features`; 1: the 4-vector only).
    camera_harmonics: int = 1
    #: A per-pixel camera map concatenated to the noisy image (:func:`att3d.render.cameras.camera_map`):
    #: ``none`` (the 4-vector alone) or ``ray`` (6 more input channels).
    camera_map: str = "none"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # or "v_prediction" (bounded clean-image estimate at high noise)

    @classmethod
    def from_dict(cls, d: dict) -> PriorArchitecture:
        """The architecture recorded in a ``prior_config.json`` / training ``config.json`` (``arch``)."""
        return cls(**{**d, "block_out_channels": tuple(d["block_out_channels"])})


@dataclass
class PriorTrainingConfig:
    """How to train the prior (see ``configs/prior.yaml``)."""

    out_dir: str = "runs/prior"
    arch: PriorArchitecture = field(default_factory=PriorArchitecture)
    max_steps: int = 4000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    cond_drop: float = 0.1
    min_snr_gamma: float = 5.0
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    log_every: int = 25
    seed: int = 0
    threads: int = 0
    device: str = "cpu"
    stop_at: int = 0  # > 0: stop (with a checkpoint) at this step, keeping the schedule of max_steps
    #: A prior folder whose UNet weights start the training (fine-tuning, e.g. converting an epsilon
    #: prior to v-prediction); ignored when resuming from a checkpoint.
    init_from: str | None = None
    #: The text of each training image: ``canonical`` (the object's caption ``a {colour} {shape}``) or
    #: ``wordings`` (WORLD.md's vocabulary: the caption with probability ``canonical_prob``, else one of the
    #: object's wordings, uniformly; every object, held-out ones included, as a web-scale prior would know them).
    captions: str = "canonical"
    canonical_prob: float = 0.25
    #: Relative sampling weight per shape name (``{"pyramid": 2.0}``; unnamed shapes weigh 1). Empty: every
    #: object is drawn uniformly, with the random stream of earlier versions.
    shape_weights: dict[str, float] = field(default_factory=dict)
    #: Rays per pixel side of the training renders: ``s`` renders each image at ``s`` times the prior's resolution
    #: and averages each ``s x s`` block (stratified supersampling, a box filter). 1: one ray through each pixel
    #: centre, as WORLD.md's renders; more: each edge pixel shows the share of it that the object covers, as an
    #: antialiased rasterizer's or a volume renderer's image does, so the prior can place an edge within a pixel.
    supersample: int = 1


def check_supersample(supersample: int) -> int:
    """``supersample`` as an int; a ValueError unless it is at least 1."""
    if int(supersample) < 1:
        raise ValueError(f"supersample must be an integer >= 1, got {supersample}")
    return int(supersample)


def training_renders(objects: list, cameras: OrbitCameras, resolution: int, supersample: int = 1) -> torch.Tensor:
    """Ground-truth training images of ``objects`` seen by ``cameras``: (B, 3, H, W) in [-1, 1], H = W =
    ``resolution``; with ``supersample`` s > 1, rendered at ``s * resolution`` and averaged over each ``s x s``
    block (the sub-pixel rays are evenly spread over each pixel, so this is the pixel's box-filtered colour)."""
    s = check_supersample(supersample)
    with torch.no_grad():
        rgb = render_objects(objects, cameras, resolution * s)["rgb"].permute(0, 3, 1, 2)
        if s > 1:
            rgb = torch.nn.functional.avg_pool2d(rgb, s)
    return rgb * 2 - 1


def build_unet(arch: PriorArchitecture):
    """A fresh UNet for ``arch``."""
    from diffusers import UNet2DConditionModel

    n = len(arch.block_out_channels)
    return UNet2DConditionModel(
        sample_size=arch.resolution, in_channels=3 + camera_map_channels(arch.camera_map), out_channels=3,
        layers_per_block=arch.layers_per_block,
        block_out_channels=tuple(arch.block_out_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=arch.cross_attention_dim, attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.norm_num_groups, class_embed_type="projection",
        projection_class_embeddings_input_dim=camera_feature_dim(arch.camera_harmonics),  # the 4-vector (+ harmonics)
    )


def build_scheduler(arch: PriorArchitecture):
    from diffusers import DDPMScheduler

    # trailing: a sampler's first step is t = T - 1, where the cosine schedule leaves no signal (alpha_bar ~ 2e-9);
    # "leading" would start at t = 960 of 1000 for 25 steps, where training images still carry their mean.
    return DDPMScheduler(num_train_timesteps=arch.num_train_timesteps, beta_schedule=arch.beta_schedule,
                         prediction_type=arch.prediction_type, clip_sample=False, timestep_spacing="trailing")


CAPTION_MODES = ("canonical", "wordings")


def caption_embeddings(arch: PriorArchitecture, captions: list[str]):
    """MiniLM token embeddings of ``captions`` plus the empty prompt (last row)."""
    from att3d.registry import TEXT_ENCODERS

    enc = TEXT_ENCODERS.build(arch.text_encoder, max_length=arch.text_max_length)
    longest = max((enc.token_count(c) for c in captions), default=0)
    if longest > arch.text_max_length:
        raise ValueError(f"a caption has {longest} tokens, more than text_max_length {arch.text_max_length}")
    return enc(list(captions) + [""])


def caption_table(objects: list, mode: str) -> tuple[list[str], list[list[int]]]:
    """The texts the prior trains on and, per object, the rows of its texts (row 0 of each list: its caption).

    Args:
        objects: the world's objects (N).
        mode: ``canonical`` (one row per object: its caption) or ``wordings`` (the caption, then every wording of
            the object that is not the caption, :func:`att3d.world.wordings.object_wordings`).

    Returns:
        ``(texts, rows)``: ``texts[rows[i][0]]`` is ``objects[i].caption``; the empty prompt is not included.
    """
    if mode not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {CAPTION_MODES}, got {mode!r}")
    texts = [o.caption for o in objects]
    rows = [[i] for i in range(len(objects))]
    if mode == "wordings":
        from att3d.world.wordings import object_wordings

        for i, obj in enumerate(objects):
            for w in object_wordings(obj):
                if w != obj.caption:
                    rows[i].append(len(texts))
                    texts.append(w)
    return texts, rows


def object_weights(objects: list, shape_weights: dict[str, float]) -> torch.Tensor | None:
    """The sampling weight of each object (N,) from per-shape weights, or None when every weight is 1.

    Raises:
        ValueError: a name that is not a shape of the world, or a weight that is negative, not finite, or leaves
            no object to draw.
    """
    from att3d.world.shapes import SHAPE_NAMES

    unknown = sorted(set(shape_weights) - set(SHAPE_NAMES))
    if unknown:
        raise ValueError(f"shape_weights: unknown shape(s) {', '.join(unknown)}; "
                         f"the shapes are {', '.join(SHAPE_NAMES)}")
    bad = [k for k, v in shape_weights.items() if not (math.isfinite(float(v)) and float(v) >= 0)]
    if bad:
        raise ValueError(f"shape_weights: the weight of {', '.join(sorted(bad))} must be a finite number >= 0")
    if all(float(v) == 1.0 for v in shape_weights.values()):
        return None
    w = torch.tensor([float(shape_weights.get(o.shape, 1.0)) for o in objects], dtype=torch.float64)
    if float(w.sum()) <= 0:
        raise ValueError("shape_weights: every object has weight 0")
    return w


def sample_objects(n: int, batch: int, weights: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """``batch`` object indices in ``[0, n)``: uniform (``torch.randint``) without weights, else drawn with
    replacement in proportion to ``weights`` (n,)."""
    if weights is None:
        return torch.randint(0, n, (batch,), generator=gen)
    return torch.multinomial(weights, batch, replacement=True, generator=gen)


def sample_rows(idx: torch.Tensor, rows: list[list[int]], canonical_prob: float,
                gen: torch.Generator) -> torch.Tensor:
    """The text row of each training image of object ``idx`` (B,): its caption with probability
    ``canonical_prob``, else one of its rows uniformly (the caption included). Draws nothing from ``gen`` when
    every object has one row, so canonical training keeps its random stream."""
    if all(len(r) == 1 for r in rows):
        return torch.tensor([rows[i][0] for i in idx.tolist()], dtype=torch.long)
    canon = torch.rand(idx.shape[0], generator=gen) < canonical_prob
    pick = torch.rand(idx.shape[0], generator=gen)
    out = []
    for i, c, u in zip(idx.tolist(), canon.tolist(), pick.tolist()):
        r = rows[i]
        out.append(r[0] if c else r[min(int(u * len(r)), len(r) - 1)])
    return torch.tensor(out, dtype=torch.long)


def save_prior(folder: str | Path, unet, scheduler, arch: PriorArchitecture, card_extra: dict | None = None) -> None:
    """Write a diffusers-style prior folder: ``unet/`` (fp16 safetensors), ``scheduler/``, ``prior_config.json``."""
    folder = Path(folder)
    unet.to(torch.float16).save_pretrained(folder / "unet", safe_serialization=True)
    unet.to(torch.float32)
    scheduler.save_pretrained(folder / "scheduler")
    meta = {"kind": "shapes", "arch": asdict(arch), **(card_extra or {})}
    save_json(folder / "prior_config.json", meta)


class _EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


def train_prior(cfg: PriorTrainingConfig, progress: bool = True) -> Path:
    """Train (or resume) the prior; returns the folder of the exported EMA prior (the checkpoint folder when
    stopped early by ``stop_at``)."""
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    ckpt = out / "checkpoint"
    device = torch.device(cfg.device)
    arch = cfg.arch
    torch.manual_seed(cfg.seed)
    unet = build_unet(arch).to(device)
    scheduler = build_scheduler(arch)
    ema = _EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    objects = all_objects()
    texts, rows = caption_table(objects, cfg.captions)
    weights = object_weights(objects, dict(cfg.shape_weights))
    check_supersample(cfg.supersample)  # before anything is written
    emb = caption_embeddings(arch, texts).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    history: list[dict] = []
    if (ckpt / "meta.json").is_file():
        meta = load_json(ckpt / "meta.json")
        unet.load_state_dict(load_tensors(ckpt / "unet.safetensors", device))
        ema.shadow = load_tensors(ckpt / "ema.safetensors", device)
        opt.load_state_dict(load_state(ckpt / "optimizer.pt"))
        rng = load_tensors(ckpt / "rng.safetensors")
        gen.set_state(rng.pop("rng.data"))
        set_rng_state(rng)
        step = int(meta["step"])
        history = meta.get("history", [])
        log.info("resumed prior training from step %d", step)
    elif cfg.init_from:
        init_unet_from(unet, cfg.init_from, arch)
        ema.shadow = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        log.info("initialised the UNet from %s", cfg.init_from)
    save_json(out / "config.json", asdict(cfg))

    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # Min-SNR-gamma weighting (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v.
    denom = snr + 1 if arch.prediction_type == "v_prediction" else snr
    loss_weight = torch.clamp(snr, max=cfg.min_snr_gamma) / denom if cfg.min_snr_gamma > 0 else torch.ones_like(snr)

    def lr_at(s: int) -> float:
        if s < cfg.warmup_steps:
            return cfg.lr * (s + 1) / cfg.warmup_steps
        p = (s - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))

    def checkpoint() -> None:
        save_tensors(ckpt / "unet.safetensors", unet.state_dict())
        save_tensors(ckpt / "ema.safetensors", ema.shadow)
        save_state(ckpt / "optimizer.pt", opt.state_dict())
        save_tensors(ckpt / "rng.safetensors", {"rng.data": gen.get_state(), **rng_state()})
        save_json(ckpt / "meta.json", {"step": step, "history": history})  # written last: marks a complete checkpoint

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress, desc="prior", dynamic_ncols=True)
    unet.train()
    t0, running = time.time(), []
    end = min(cfg.stop_at, cfg.max_steps) if cfg.stop_at > 0 else cfg.max_steps
    while step < end:
        idx = sample_objects(len(objects), cfg.batch_size, weights, gen)
        cams = OrbitCameras.sample_training(cfg.batch_size, gen)
        x0 = training_renders([objects[i] for i in idx.tolist()], cams, arch.resolution, cfg.supersample).to(device)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_drop
        text = sample_rows(idx, rows, cfg.canonical_prob, gen)
        tidx = torch.where(drop, torch.full_like(idx, len(texts)), text).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, arch.num_train_timesteps, (cfg.batch_size,), generator=gen).to(device)
        xt = scheduler.add_noise(x0, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        cam = camera_features(cams.as_vector(), arch.camera_harmonics).to(device)
        pred = unet(unet_input(xt, cams, arch.camera_map), t, encoder_hidden_states=emb.tokens[tidx], class_labels=cam,
                    encoder_attention_mask=emb.mask[tidx].float()).sample
        target = scheduler.get_velocity(x0, noise, t) if arch.prediction_type == "v_prediction" else noise
        per = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            log.warning("non-finite prior loss at step %d; step skipped", step)
            step += 1
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(unet, step)
        step += 1
        running.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0:
            rate = len(running) / (time.time() - t0)
            history.append({"step": step, "loss": sum(running) / len(running), "steps_per_s": rate})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", it_s=f"{rate:.2f}")
            log.info("step %d loss %.4f (%.2f it/s)", step, history[-1]["loss"], rate)
            t0, running = time.time(), []
        if step % cfg.checkpoint_every == 0 or step == end:
            checkpoint()
    bar.close()
    if step < cfg.max_steps:
        return ckpt
    export = out / "prior"
    final = build_unet(arch)
    final.load_state_dict(ema.shadow)
    save_prior(export, final, scheduler, arch, {"training": {"steps": step, "batch_size": cfg.batch_size,
                                                              "lr": cfg.lr, "ema_decay": cfg.ema_decay,
                                                              "cond_drop": cfg.cond_drop,
                                                              "captions": cfg.captions,
                                                              "canonical_prob": cfg.canonical_prob,
                                                              "shape_weights": dict(cfg.shape_weights),
                                                              "supersample": cfg.supersample,
                                                              "min_snr_gamma": cfg.min_snr_gamma,
                                                              "init_from": _init_record(cfg.init_from),
                                                              "history": history}})
    return export


def init_unet_from(unet: torch.nn.Module, folder: str | Path, arch: PriorArchitecture) -> None:
    """Load the UNet weights of the prior folder ``folder`` into ``unet`` (built for ``arch``).

    The network must match (resolution, blocks, text and camera sizes); the prediction type may differ, which
    is how an epsilon prior is fine-tuned into a v-prediction one; ``camera_harmonics`` may grow, and a
    ``camera_map`` may be added to a prior without one: the new inputs' weights (the camera projection's columns of
    the new harmonics, the first convolution's channels of the map) start at zero, so the fine-tuning starts from
    the same network.

    Raises:
        ValueError: the folder is not a prior, or its network does not match ``arch``.
    """
    folder = Path(folder)
    config = folder / "prior_config.json"
    if not config.is_file():
        raise ValueError(f"init_from={folder}: no prior_config.json (not a prior folder)")
    theirs = asdict(PriorArchitecture.from_dict(load_json(config)["arch"]))
    mine = asdict(PriorArchitecture.from_dict(asdict(arch)))  # the same normalisation (tuples) on both sides
    grows = ("prediction_type", "camera_harmonics", "camera_map")
    mismatched = [k for k, v in mine.items() if k not in grows and theirs.get(k) != v]
    if theirs.get("camera_harmonics", 1) > mine["camera_harmonics"]:
        mismatched.append("camera_harmonics (fewer than the folder's)")
    if theirs.get("camera_map", "none") not in ("none", mine["camera_map"]):
        mismatched.append(f"camera_map ({theirs['camera_map']} in the folder)")
    if mismatched:
        raise ValueError(f"init_from={folder}: architecture differs in {', '.join(sorted(mismatched))}")
    weights = sorted((folder / "unet").glob("*.safetensors"))
    if not weights:
        raise ValueError(f"init_from={folder}: no unet/*.safetensors")
    state = {k: v.to(torch.float32) for k, v in load_tensors(weights[0]).items()}
    own = unet.state_dict()
    # (D, camera inputs): the new harmonics' columns; (C, 3 + map, k, k): the camera map's channels; both from zero
    for key in ("class_embedding.linear_1.weight", "conv_in.weight"):
        if key in state and state[key].shape[1] < own[key].shape[1]:
            extra = own[key].new_zeros((own[key].shape[0], own[key].shape[1] - state[key].shape[1],
                                        *own[key].shape[2:]))
            state[key] = torch.cat([state[key], extra], 1)
    unet.load_state_dict(state)


def _init_record(folder: str | None) -> dict | None:
    """What a fine-tuned prior started from: the folder and its own training record."""
    if not folder:
        return None
    meta = load_json(Path(folder) / "prior_config.json")
    return {"path": str(folder), "prediction_type": meta["arch"].get("prediction_type"),
            "training": {k: v for k, v in meta.get("training", {}).items() if k != "history"}}


def export_checkpoint(out_dir: str | Path, export: str | Path | None = None) -> Path:
    """Export the EMA weights of the latest complete checkpoint in ``out_dir`` as a prior folder."""
    out = Path(out_dir)
    cfg = load_json(out / "config.json")
    arch = PriorArchitecture.from_dict(cfg["arch"])
    meta = load_json(out / "checkpoint" / "meta.json")
    unet = build_unet(arch)
    unet.load_state_dict(load_tensors(out / "checkpoint" / "ema.safetensors"))
    export = Path(export) if export else out / f"prior-step{meta['step']}"
    init = cfg.get("init_from")
    record = {"steps": meta["step"], "init_from": _init_record(init) if init and Path(init).is_dir() else init,
              "shape_weights": cfg.get("shape_weights", {}), "supersample": cfg.get("supersample", 1),
              "history": meta.get("history", [])}
    save_prior(export, unet, build_scheduler(arch), arch, {"training": record})
    return export

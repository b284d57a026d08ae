"""The score model: one class for reward models, cost models and both PPO critics (DESIGN §3).

A base-model backbone (any `AutoModel`: the causal LM without its LM head) and a linear head that
maps each position's last hidden state to K scores. The *end score* of a sequence is the score at
its last position where `attention_mask == 1`, which is right for right- and left-padded batches.

Notation: B batch, L sequence length, H hidden size, K score dimension (1 for a reward model or a
critic; one per harm category for a multi-head cost model). With K = 1 the K axis is squeezed.

Running statistics: in training mode every forward merges its batch of end scores into an exact
running mean and (population) variance over all end scores seen so far (Chan et al.'s parallel
form of Welford's algorithm: no momentum, no bias towards recent batches). Under data parallelism
each rank records its own shard; a trainer wanting global statistics calls `update_score_stats`
with gathered scores in eval mode instead. Normalisation `(x - mean) / sqrt(var + eps)` of all
outputs is off by default (`normalize=False`).

Saved layout (`save_pretrained`), a directory `AutoModel.from_pretrained` also loads:
  config.json, model.safetensors     the backbone, under the names AutoModel expects
  score_head.safetensors             `weight` (K, H) and `bias` (K,)
  score_model.json                   score_dim, bias, normalize, kind, running statistics
  tokenizer files                    when a tokenizer is given

A fresh head (built on a plain causal-LM or base checkpoint) is initialised N(0, 1/sqrt(H + 1))
with a zero bias, as in the original safe-rlhf: scores start small but the backbone still gets a
gradient from the first step (a zero head would block it).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from saferlhf.models.hf import atomic_directory, dtype_from_str, resize_embeddings, sync_special_tokens

SCORE_MODEL_FILE = "score_model.json"
SCORE_HEAD_FILE = "score_head.safetensors"
_NORM_EPS = 1e-5


class ScoreOutput(NamedTuple):
    """Scores are float32 whatever the model dtype; K = 1 is squeezed away."""

    scores: torch.Tensor  # (B, L) or (B, L, K): a score at every position, padding included
    end_scores: torch.Tensor  # (B,) or (B, K): the score at each row's last attended position
    last_hidden: torch.Tensor | None = None  # (B, L, H) in the backbone dtype, when asked for


def end_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with `attention_mask == 1` in each row: (B, L) → (B,) int64.

    The largest attended index, so right and left padding both work; an all-zero row gives 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (L,)
    return (attention_mask.long() * positions).argmax(dim=-1)  # (B,)


def _load_backbone(path, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """``AutoModel.from_pretrained`` without transformers' load report for the one expected difference.

    A score model is usually built on a causal LM's checkpoint, whose LM head the backbone does not use;
    transformers reports those unused weights as a warning table on every load. Any other missing or
    unexpected weight is still reported, as one warning naming them.
    """
    import logging

    from transformers.utils import logging as hf_logging

    report = hf_logging.get_logger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        backbone, info = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                   output_loading_info=True)
    finally:
        report.setLevel(level)
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(("lm_head.", "score."))]
    missing = list(info.get("missing_keys", []))
    if unexpected or missing:
        logging.getLogger(__name__).warning("%s: backbone weights missing %s, unexpected %s", path, missing[:8],
                                            unexpected[:8])
    return backbone


class ScoreModel(nn.Module):
    """`backbone` (an AutoModel without LM head) + `score_head` = Linear(H, K)."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        score_dim: int = 1,
        bias: bool = True,
        normalize: bool = False,
        kind: str = "score",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.score_dim = score_dim
        self.normalize = normalize
        self.kind = kind  # "reward", "cost", "critic", ...: recorded in score_model.json
        # A score model never generates, so a KV cache would only cost memory.
        backbone.config.use_cache = False
        hidden_size = backbone.config.get_text_config().hidden_size
        self.score_head = nn.Linear(
            hidden_size, score_dim, bias=bias, dtype=backbone.dtype, device=backbone.device
        )
        nn.init.normal_(self.score_head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        if bias:
            nn.init.zeros_(self.score_head.bias)
        # Statistics stay float32 (the count int64) unless the whole module is cast.
        self.register_buffer("running_mean", torch.zeros(score_dim, device=backbone.device))
        self.register_buffer("running_var", torch.ones(score_dim, device=backbone.device))
        self.register_buffer("running_count", torch.zeros((), dtype=torch.long, device=backbone.device))
        # Passing position ids that start at each row's first real token makes a left-padded row
        # see the same positions as the unpadded sequence; not every architecture takes them.
        self._takes_position_ids = "position_ids" in inspect.signature(backbone.forward).parameters
        # Start in the backbone's mode: eval after from_pretrained (the HF convention), train otherwise.
        self.train(backbone.training)

    @property
    def config(self) -> PretrainedConfig:
        """The backbone config (DeepSpeed and HF utilities read hidden_size etc. from here)."""
        return self.backbone.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the backbone's layers (non-reentrant by default; the head is cheap)."""
        if gradient_checkpointing_kwargs is None:
            gradient_checkpointing_kwargs = {"use_reentrant": False}
        self.backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden: bool = False,
        position_ids: torch.Tensor | None = None, **packed,
    ) -> ScoreOutput:
        """input_ids, attention_mask: (B, L) → ScoreOutput (scores (B, L[, K]), end_scores (B[, K])).

        A packed call (:meth:`saferlhf.models.packing.Packed.model_kwargs`: one row of S tokens, the
        sequences' ``cu_seq_lens_q``) returns scores (1, S[, K]) and the end score of every packed
        sequence, (N[, K]), taken at its last token.
        """
        extra = dict(packed)
        if position_ids is not None:
            extra["position_ids"] = position_ids
        elif self._takes_position_ids:
            extra["position_ids"] = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, L)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        scores = self.score_head(hidden.to(self.score_head.weight.dtype)).float()  # (B, L, K)
        if "cu_seq_lens_q" in packed:
            end_scores = scores[0, packed["cu_seq_lens_q"][1:].long() - 1]  # (N, K)
        else:
            rows = torch.arange(scores.shape[0], device=scores.device)
            end_scores = scores[rows, end_positions(attention_mask)]  # (B, K)
        if self.training:
            self.update_score_stats(end_scores)
        if self.normalize:
            scale = torch.rsqrt(self.running_var.float() + _NORM_EPS)  # (K,)
            scores = (scores - self.running_mean.float()) * scale
            end_scores = (end_scores - self.running_mean.float()) * scale
        if self.score_dim == 1:
            scores, end_scores = scores.squeeze(-1), end_scores.squeeze(-1)
        return ScoreOutput(scores, end_scores, hidden if output_hidden else None)

    @torch.no_grad()
    def update_score_stats(self, end_scores: torch.Tensor) -> None:
        """Merge a batch of end scores, (N,) or (N, K), into the running mean/variance (no host sync)."""
        batch = end_scores.detach().float().reshape(-1, self.score_dim)  # (N, K)
        n_batch = batch.shape[0]
        batch_mean = batch.mean(dim=0)  # (K,)
        batch_var = batch.var(dim=0, unbiased=False)  # (K,)
        n_seen = self.running_count.float()
        n_total = n_seen + n_batch
        mean = self.running_mean.float()
        delta = batch_mean - mean
        # Chan et al.: M2 = M2_a + M2_b + delta² · n_a · n_b / n, with M2 = n · variance.
        m2 = (
            self.running_var.float() * n_seen
            + batch_var * n_batch
            + delta.square() * n_seen * n_batch / n_total
        )
        self.running_mean.copy_(mean + delta * n_batch / n_total)
        self.running_var.copy_(m2 / n_total)
        self.running_count.add_(n_batch)

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        score_dim: int = 1,
        bias: bool = True,
        normalize: bool = False,
        kind: str = "score",
        dtype: str | torch.dtype = "float32",
    ) -> ScoreModel:
        """A randomly initialised backbone of `config` (e.g. a LlamaConfig) with a fresh head."""
        backbone = AutoModel.from_config(config, dtype=dtype_from_str(dtype))
        return cls(backbone, score_dim=score_dim, bias=bias, normalize=normalize, kind=kind)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: str | torch.dtype = "float32",
        score_dim: int | None = None,
        bias: bool | None = None,
        normalize: bool | None = None,
        kind: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        trust_remote_code: bool = False,
    ) -> ScoreModel:
        """Load a saved score model exactly, or build one on a causal-LM / base-model checkpoint.

        A directory holding `score_model.json` restores backbone, head and running statistics;
        `score_dim` and `bias` must then match the saved head (or be None), while `normalize` and
        `kind` may override the saved values (e.g. a critic initialised from a reward model).
        Anything else (an SFT output, a hub id) gives that backbone, its LM head dropped, and a
        fresh head with defaults score_dim=1, bias=True. `tokenizer` grows the embeddings to its
        vocabulary (mean-initialised rows) and sets the special token ids. The model is returned
        in eval mode, as HF's `from_pretrained` does.
        """
        backbone = _load_backbone(path, dtype_from_str(dtype), trust_remote_code)
        meta_file = Path(path) / SCORE_MODEL_FILE
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            for name, requested in (("score_dim", score_dim), ("bias", bias)):
                if requested is not None and requested != meta[name]:
                    raise ValueError(f"{path} holds a score head with {name}={meta[name]}, not {requested}")
            model = cls(
                backbone,
                score_dim=meta["score_dim"],
                bias=meta["bias"],
                normalize=meta["normalize"] if normalize is None else normalize,
                kind=meta["kind"] if kind is None else kind,
            )
            model.score_head.load_state_dict(load_file(Path(path) / SCORE_HEAD_FILE))
            model.running_mean.copy_(torch.tensor(meta["running_mean"]))
            model.running_var.copy_(torch.tensor(meta["running_var"]))
            model.running_count.fill_(meta["running_count"])
        else:
            model = cls(
                backbone,
                score_dim=1 if score_dim is None else score_dim,
                bias=True if bias is None else bias,
                normalize=bool(normalize),
                kind="score" if kind is None else kind,
            )
        if tokenizer is not None:
            resize_embeddings(model.backbone, tokenizer)
            sync_special_tokens(model.backbone, tokenizer)
        return model

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the layout in the module docstring atomically to `out_dir`.

        `state_dict`: this module's full state dict (keys `backbone.*`, `score_head.*`, buffers), e.g.
        gathered from ZeRO-3 partitions, to write instead of the module's own tensors.
        """
        if state_dict is None:
            state_dict = self.state_dict()
        backbone_state = {
            k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")
        }
        head_state = {
            k.removeprefix("score_head."): v.detach().contiguous().cpu()
            for k, v in state_dict.items()
            if k.startswith("score_head.")
        }
        stats = {name: state_dict.get(name, getattr(self, name)) for name in ("running_mean", "running_var")}
        meta = {
            "kind": self.kind,
            "score_dim": self.score_dim,
            "bias": self.score_head.bias is not None,
            "normalize": self.normalize,
            **{name: value.float().cpu().tolist() for name, value in stats.items()},
            "running_count": int(state_dict.get("running_count", self.running_count)),
        }
        with atomic_directory(out_dir) as tmp:
            self.backbone.save_pretrained(tmp, state_dict=backbone_state)  # consumes backbone_state
            save_file(head_state, tmp / SCORE_HEAD_FILE, metadata={"format": "pt"})
            (tmp / SCORE_MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return Path(out_dir)

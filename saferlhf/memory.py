"""Per-GPU memory of one PPO-Lagrangian step, predicted from the configuration: does it fit?

``saferlhf bench memory`` (``main``) and ``estimate(MemoryConfig(...))`` add up, per GPU, what the
six models of the trainer (actor, reference, reward, cost, reward critic, cost critic, each on its
own DeepSpeed engine) hold all the time, then the largest of the step's transient phases, and
compare the sum with the GPU's capacity. Pure arithmetic: nothing here imports torch.

Notation: Ψ parameters of one model; W world size (GPUs); b bytes of the compute dtype (2 for
bf16/fp16, 4 for fp32); h hidden size, n layers, a attention heads of size d, k key/value heads,
i MLP width, V vocabulary; m micro-batch (sequences per backward), R rollout batch (sequences
scored at once per GPU), L sequence length (prompt + response), T response length.
GB = 10^9 bytes, as in benchmarks/RESULTS.md (an "80 GB" H100 holds about 85 of them).

Parameters (Llama blocks, no biases): a block has h·a·d (q) + 2·h·k·d (k, v) + a·d·h (o) +
3·h·i (gate, up, down) + 2h (norms); a causal LM adds the embedding V·h, the final norm h and
the LM head V·h (unless tied); a score model (reward, cost, critics) has the same backbone without
the LM head and a Linear(h, 1) head with bias.

Resident, per model, bytes per GPU (the ZeRO paper, Rajbhandari et al. 2020: mixed-precision Adam
keeps 2Ψ weights + 2Ψ gradients + 12Ψ optimizer states = fp32 master weights, momentum, variance):

    ZeRO stage          0       1       2       3
    trained weights     bΨ      bΨ      bΨ      bΨ/W
    gradients           bΨ      bΨ      bΨ/W    bΨ/W
    optimizer states    sΨ      sΨ/W    sΨ/W    sΨ/W      s = 12 (bf16/fp16), 8 (fp32: no master copy)
    frozen weights      bΨ      bΨ      bΨ      bΨ/W      reference, reward, cost: no grads, no optimizer

- ``offload=optimizer`` (stage >= 1, ZeRO-Offload) moves the optimizer states to CPU memory and,
  at stage >= 2, the gradient partitions as well; ``offload=all`` (stage 3) also moves every
  parameter, frozen models included (the trainer gives them the same ZeRO config).
- ZeRO buffers (DeepSpeed's defaults, approximate): at stage >= 1 each trained engine keeps a
  gradient reduce bucket of min(5e8, Ψ) elements; at stage 3 the running model gathers its
  largest module (the V·h embedding or LM head, or an MLP matrix) plus the 5e7-parameter prefetch
  bucket the trainer configures.
- A fixed runtime overhead (CUDA context, NCCL, allocator fragmentation): ``--overhead-gb``.

Transient: only one phase runs at a time, so the largest one counts (bytes per GPU). ``--logprobs``
names the configuration: ``fused`` is the trainer's (fused log-probs, the fused RMSNorm and SwiGLU
of ``saferlhf.models.fused``, the LM head over the response's T + 1 positions only); ``reference``
is the original's (``SAFERLHF_OPS=reference``: transformers' layers, the LM head over all L):

- actor update, per token of the micro-batch (m·L tokens), what autograd saves per block:
  for the two RMSNorms 2·(4h + 2bh) (an fp32 copy of the input, the normalised input and the
  output), fused 2·(2bh + 4) (the input, 1/rms and the output) + 5·b·a·d for attention (q, k and v
  after RoPE, k and v repeated to a heads because a padding mask rules out GQA inside SDPA, the
  output and its contiguous copy) + for the SwiGLU MLP 4·b·i (gate, up, SiLU(gate), their
  product), fused 3·b·i (no SiLU(gate)); n blocks of it, or with gradient checkpointing n·b·h (the
  block inputs) + one block recomputed; plus the final norm. On top, the logits (m, H, V) stay
  alive through the backward (H head positions: T + 1 fused, L reference), and the log-prob op
  adds, in units of m·V bytes: fused kernel: (m, T, V) gradient + (m, H, V) gradient of the slice =
  2Hb + Tb in all; reference (fp32 upcast + log_softmax + gather): max(Lb + 12T, 2Lb + Tb) — the
  saved fp32 log-softmax, its incoming gradient and its input gradient (3 × 4T) at the worst moment.
- critic update: the same activations for the critic's shape, without logits.
- log-prob pass (actor or reference, no grad, R sequences): max(R·L·b·(2h + 3i) inside a block,
  R·L·b·h + R·H·V·b + op) with op = the head's input copy R·(T + 1)·b·h for the fused
  configuration and 2 × 4·R·T·V for the reference (the fp32 upcast, then the log-softmax output
  next to it).
- entropy pass (actor, ``saferlhf.models.passes.mean_entropy``): the logits R·H·V·b, a copy of
  the response logits R·T·V·b (reshaping the non-contiguous (R, T, V) slice copies it when R > 1)
  and 16 bytes per element of one chunk of ENTROPY_CHUNK rows of V (its fp32 temporaries).
- score pass (reward, cost, critics' values, no grad): R·L·b·(2h + 3i) inside a block.
- generation: the KV cache of HF ``generate``, 2·n·k·d·b per token of R·L, or ``--kv-cache-gb``
  (e.g. a vLLM pool; an engine that sleeps during training frees it, so it is a phase too).

Against measurements (benchmarks/RESULTS.md, H100, 514M Llama, V = 128256, rollout 32 × (128 + 512),
micro-batch 8, plain torch bf16): log-prob pass 22.06 GB (reference) / 4.29 GB (fused), predicted
22.11 / 4.29; one actor update 12.47 / 6.64 GB, predicted 12.52 / 6.70 (tests/test_memory_model.py).

Not modelled: DeepSpeed's bf16 optimizer at stages 0–1 may also keep fp32 gradient accumulators;
ZeRO-3's live-parameter cache beyond the prefetch bucket; the attention mask, the rollout's own
tensors and other small terms; with ``data.ptx`` set, the activations and logits of the PTX (SFT)
batch, which the actor update holds in the same backward.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

GB = 1e9
ENTROPY_CHUNK = 1024  # rows per chunk in saferlhf.models.passes.mean_entropy (a test keeps them equal)
REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size (elements)
PREFETCH_BUCKET = 5e7  # stage3_prefetch_bucket_size, as saferlhf.distributed configures it
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
MODES = {"ppo_lag": 2, "ppo": 1, "ppo_rs": 1}  # mode -> critics
OFFLOAD = ("none", "optimizer", "all")
LOGPROBS = ("fused", "reference")


class MemoryModelError(ValueError):
    """Bad input; the message names the command-line flag."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder: sizes as in a transformers config (head_dim 0: hidden // heads)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0
    tied_embeddings: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MemoryModelError(f"{_flag(f)} must be a positive integer, got {value!r}")
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 0:
            raise MemoryModelError(f"--head-dim must be a positive integer, got {self.head_dim!r}")
        if self.heads % self.kv_heads:
            raise MemoryModelError(f"--kv-heads ({self.kv_heads}) must divide --heads ({self.heads})")
        if not self.head_dim and self.hidden % self.heads:
            raise MemoryModelError(f"--heads ({self.heads}) must divide --hidden ({self.hidden})")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def block_params(self) -> int:
        h, d = self.hidden, self.dim_head
        attention = 2 * h * self.heads * d + 2 * h * self.kv_heads * d  # q, o; k, v
        return attention + 3 * h * self.intermediate + 2 * h  # + gate, up, down; two norms

    def backbone_params(self) -> int:
        """Embedding, blocks and final norm: what a score model shares with the causal LM."""
        return self.vocab * self.hidden + self.layers * self.block_params() + self.hidden

    def causal_lm_params(self) -> int:
        return self.backbone_params() + (0 if self.tied_embeddings else self.vocab * self.hidden)

    def score_model_params(self) -> int:
        return self.backbone_params() + self.hidden + 1  # Linear(h, 1) with bias

    def largest_module(self) -> int:
        """Parameters of the largest single module ZeRO-3 gathers at once."""
        return max(self.vocab * self.hidden, self.intermediate * self.hidden, self.heads * self.dim_head * self.hidden)


def _shape(size: str, name: str) -> ModelShape:
    """A shape of ``saferlhf.models.tiny.TINY_SIZES`` with its benchmark vocabulary."""
    from saferlhf.models.tiny import BENCHMARK_VOCAB, TINY_SIZES

    t = TINY_SIZES[size]
    return ModelShape(t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"],
                      t["intermediate_size"], BENCHMARK_VOCAB[size], name=name)


# Llama shapes. "tiny", "20m" and "gpu-0.5b" (the benchmarks' "gpu" model): saferlhf.models.tiny's.
PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _shape("tiny", "tiny"),
        _shape("20m", "20m"),
        _shape("gpu", "gpu-0.5b"),
        ModelShape(4096, 32, 32, 32, 11008, 32000, name="llama-7b"),
        ModelShape(5120, 40, 40, 40, 13824, 32000, name="llama-13b"),
        ModelShape(8192, 80, 64, 8, 28672, 32000, name="llama-2-70b"),
        ModelShape(4096, 32, 32, 8, 14336, 128256, name="llama-3-8b"),
    )
}

_HF_KEYS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
            "intermediate": "intermediate_size", "vocab": "vocab_size"}


def shape_from_hf_config(path: str | Path, flag: str = "--hf-config") -> ModelShape:
    """The shape in a transformers ``config.json`` (or a checkpoint directory holding one)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise MemoryModelError(f"{flag} {path}: cannot read a JSON config ({e})") from e
    if not isinstance(config, dict):
        raise MemoryModelError(f"{flag} {path}: not a JSON object")
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # a multimodal checkpoint: the language model's config
    missing = [key for key in _HF_KEYS.values() if key not in config]
    if missing:
        raise MemoryModelError(f"{flag} {path}: missing {', '.join(missing)}")
    sizes = {name: config[key] for name, key in _HF_KEYS.items()}
    sizes["kv_heads"] = config.get("num_key_value_heads") or sizes["heads"]
    try:
        return ModelShape(**sizes, head_dim=config.get("head_dim") or 0,
                          tied_embeddings=bool(config.get("tie_word_embeddings", False)), name=file.parent.name)
    except MemoryModelError as e:
        raise MemoryModelError(f"{flag} {path}: {e}") from e


def resolve_shape(spec: str, flag: str) -> ModelShape:
    """A preset name, or the path of a transformers config.json (or of its directory)."""
    if spec in PRESETS:
        return PRESETS[spec]
    if Path(spec).exists():
        return shape_from_hf_config(spec, flag)
    raise MemoryModelError(f"{flag}: unknown preset {spec!r} and no such file; presets: {', '.join(PRESETS)}")


@dataclass(frozen=True)
class MemoryConfig:
    """One PPO step's configuration, per GPU. ``None`` shapes follow the actor (critics: the score models)."""

    actor: ModelShape
    reward: ModelShape | None = None
    cost: ModelShape | None = None
    critic: ModelShape | None = None  # both critics; None: reward critic = reward, cost critic = cost
    mode: str = "ppo_lag"
    cost_model: bool = True  # ppo may run without one; ppo_lag and ppo_rs need it
    zero_stage: int = 3
    world_size: int = 1
    offload: str = "none"
    dtype: str = "bf16"
    micro_batch: int = 8
    rollout_batch: int | None = None  # None: micro_batch
    seq_len: int = 512
    response_len: int | None = None  # None: seq_len (an upper bound)
    gradient_checkpointing: bool = False
    logprobs: str = "fused"
    kv_cache_gb: float | None = None  # None: HF generate's cache from the actor's shape
    gpu_memory: float = 80.0
    overhead_gb: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DTYPE_ALIASES.get(self.dtype, self.dtype))
        if self.mode not in MODES:
            raise MemoryModelError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.cost_model and self.mode != "ppo":
            raise MemoryModelError(f"--no-cost-model: mode {self.mode} needs a cost model")
        if self.zero_stage not in (0, 1, 2, 3):
            raise MemoryModelError(f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.offload not in OFFLOAD:
            raise MemoryModelError(f"--offload must be one of {', '.join(OFFLOAD)}, got {self.offload!r}")
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise MemoryModelError("--offload optimizer needs --zero-stage 1, 2 or 3")
        if self.offload == "all" and self.zero_stage != 3:
            raise MemoryModelError("--offload all (parameters too) needs --zero-stage 3")
        if self.dtype not in DTYPE_BYTES:
            raise MemoryModelError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.logprobs not in LOGPROBS:
            raise MemoryModelError(f"--logprobs must be one of {', '.join(LOGPROBS)}, got {self.logprobs!r}")
        for name in ("world_size", "micro_batch", "rollout_batch", "seq_len", "response_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise MemoryModelError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if self.response_len is not None and self.response_len > self.seq_len:
            raise MemoryModelError(f"--response-len ({self.response_len}) exceeds --seq-len ({self.seq_len})")
        for name in ("kv_cache_gb", "gpu_memory", "overhead_gb"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise MemoryModelError(f"{_flag(name)} must be a finite number >= 0, got {value!r}")
        if self.gpu_memory <= 0:
            raise MemoryModelError(f"--gpu-memory must be > 0 GB, got {self.gpu_memory!r}")

    # -- derived values ------------------------------------------------------------------------
    @property
    def b(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def n_rollout(self) -> int:
        return self.rollout_batch or self.micro_batch

    @property
    def n_response(self) -> int:
        return self.response_len or self.seq_len

    def shapes(self) -> dict[str, ModelShape | None]:
        """Each of the six models' shape; None where the mode has no such model."""
        reward = self.reward or self.actor
        cost = (self.cost or self.actor) if self.cost_model else None
        return {
            "actor": self.actor,
            "reference": self.actor,
            "reward": reward,
            "cost": cost,
            "reward_critic": self.critic or reward,
            "cost_critic": (self.critic or self.cost or self.actor) if MODES[self.mode] == 2 else None,
        }


TRAINED = ("actor", "reward_critic", "cost_critic")
LABELS = {
    "weights_actor": "weights: actor (trained)",
    "weights_reference": "weights: reference (frozen)",
    "weights_reward": "weights: reward model (frozen)",
    "weights_cost": "weights: cost model (frozen)",
    "weights_reward_critic": "weights: reward critic (trained)",
    "weights_cost_critic": "weights: cost critic (trained)",
    "gradients": "gradients (trained models)",
    "optimizer_states": "optimizer states (trained models)",
    "zero_buffers": "ZeRO buffers (reduce buckets, gathered params)",
    "runtime_overhead": "runtime overhead (--overhead-gb)",
    "actor_update": "actor update: activations + logits",
    "critic_update": "critic update: activations",
    "logprob_pass": "log-prob pass (actor / reference)",
    "entropy_pass": "entropy pass (actor)",
    "score_pass": "score pass (reward / cost / values)",
    "generation": "generation: KV cache",
}


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU: ``resident`` all the time, plus the largest of the ``phases``."""

    config: MemoryConfig
    params: dict[str, int]  # model -> parameters (0: absent)
    resident: dict[str, float]  # component -> bytes
    phases: dict[str, float]  # phase -> peak bytes

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def total(self) -> float:
        return sum(self.resident.values()) + self.phases[self.peak_phase]

    @property
    def capacity(self) -> float:
        return self.config.gpu_memory * GB

    @property
    def margin(self) -> float:
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.margin >= 0

    def to_dict(self) -> dict:
        config = {f.name: getattr(self.config, f.name) for f in fields(self.config)}
        for name, shape in self.config.shapes().items():
            config[name] = asdict(shape) if shape is not None else None
        del config["critic"]
        config.update(rollout_batch=self.config.n_rollout, response_len=self.config.n_response)
        return {
            "components_gb": {k: round(v / GB, 3) for k, v in {**self.resident, **self.phases}.items()},
            "resident_gb": round(sum(self.resident.values()) / GB, 3),
            "peak_phase": self.peak_phase,
            "total_gb": round(self.total / GB, 3),
            "capacity_gb": self.config.gpu_memory,
            "margin_gb": round(self.margin / GB, 3),
            "fits": self.fits,
            "params": self.params,
            "config": config,
        }


def _norm_activations(s: ModelShape, b: int, fused: bool) -> int:
    """Bytes one RMSNorm keeps per token for the backward (module docstring)."""
    return 2 * b * s.hidden + 4 if fused else 4 * s.hidden + 2 * b * s.hidden


def _block_activations(s: ModelShape, b: int, fused: bool = False) -> int:
    """Bytes autograd saves per token in one block (module docstring)."""
    norms = 2 * _norm_activations(s, b, fused)
    attention = 5 * b * s.heads * s.dim_head
    mlp = (3 if fused else 4) * b * s.intermediate
    return norms + attention + mlp


def _backbone_activations(s: ModelShape, b: int, tokens: int, checkpointing: bool, fused: bool = False) -> float:
    """Saved activations of a training forward over ``tokens``, final norm included."""
    per_block = _block_activations(s, b, fused)
    blocks = s.layers * b * s.hidden + per_block if checkpointing else s.layers * per_block
    return tokens * (blocks + _norm_activations(s, b, fused))


def _forward_peak(s: ModelShape, b: int, tokens: int) -> float:
    """Peak inside one block of a no-grad forward: residual, normed input, SiLU(gate), up, product."""
    return tokens * b * (2 * s.hidden + 3 * s.intermediate)


def logprob_pass_bytes(c: MemoryConfig, s: ModelShape | None = None) -> float:
    """Peak extra bytes of one no-grad log-prob pass (``response_logprobs``) of R sequences."""
    s = s or c.actor
    n, seq, t, b = c.n_rollout, c.seq_len, c.n_response, c.b
    fused = c.logprobs == "fused"
    op = 0 if fused else 8 * n * t * s.vocab
    at_logits = n * seq * b * s.hidden + n * _head_positions(c) * s.vocab * b + op
    if fused:  # the LM head's input: the non-contiguous last T + 1 positions, copied
        at_logits += n * (t + 1) * b * s.hidden
    return max(_forward_peak(s, b, n * seq), at_logits)


def _head_positions(c: MemoryConfig) -> int:
    """Positions the LM head runs over: the response's T + 1 (fused), every one (reference)."""
    return min(c.n_response + 1, c.seq_len) if c.logprobs == "fused" else c.seq_len


def actor_update_bytes(c: MemoryConfig) -> float:
    """Peak extra bytes of one actor micro-batch: saved activations + logits and their gradients."""
    s, m, seq, t, b = c.actor, c.micro_batch, c.seq_len, c.n_response, c.b
    fused = c.logprobs == "fused"
    head = _head_positions(c)
    kernel = 2 * head * b + t * b  # logits + d(slice) + d(logits), per m·V
    logits = kernel if fused else max(seq * b + 12 * t, kernel)
    return _backbone_activations(s, b, m * seq, c.gradient_checkpointing, fused) + m * s.vocab * logits


def estimate(c: MemoryConfig) -> Estimate:
    """Per-GPU bytes of every component of the step (formulas in the module docstring)."""
    shapes = c.shapes()
    params = {name: (0 if s is None else s.causal_lm_params() if name in ("actor", "reference")
                     else s.score_model_params()) for name, s in shapes.items()}
    b, w, stage = c.b, c.world_size, c.zero_stage
    optimizer_bytes = 12 if b == 2 else 8
    weights_off = c.offload == "all"
    optimizer_off = c.offload in ("optimizer", "all")

    resident: dict[str, float] = {}
    for name, psi in params.items():
        resident[f"weights_{name}"] = 0.0 if weights_off else b * psi / (w if stage == 3 else 1)
    trained = sum(params[name] for name in TRAINED)
    grads_on_gpu = not (optimizer_off and stage >= 2)  # ZeRO-Offload streams gradient partitions to CPU
    resident["gradients"] = b * trained / (w if stage >= 2 else 1) if grads_on_gpu else 0.0
    resident["optimizer_states"] = 0.0 if optimizer_off else optimizer_bytes * trained / (w if stage >= 1 else 1)
    buffers = 0.0
    if stage >= 1:
        buffers += sum(b * min(REDUCE_BUCKET, params[name]) for name in TRAINED)
    if stage == 3:
        buffers += max(b * min(params[name], s.largest_module() + PREFETCH_BUCKET)
                       for name, s in shapes.items() if s is not None)
    resident["zero_buffers"] = buffers
    resident["runtime_overhead"] = c.overhead_gb * GB

    n, seq, t = c.n_rollout, c.seq_len, c.n_response
    critics = [shapes[name] for name in ("reward_critic", "cost_critic") if shapes[name] is not None]
    scorers = [s for name, s in shapes.items() if s is not None and name not in ("actor", "reference")]
    copy = n * t * c.actor.vocab * b if n > 1 else 0  # mean_entropy reshapes a non-contiguous slice
    kv = 2 * c.actor.layers * c.actor.kv_heads * c.actor.dim_head * b * n * seq
    phases = {
        "actor_update": actor_update_bytes(c),
        "critic_update": max(_backbone_activations(s, b, c.micro_batch * seq, c.gradient_checkpointing,
                                                   c.logprobs == "fused") for s in critics),
        "logprob_pass": logprob_pass_bytes(c),
        "entropy_pass": (n * _head_positions(c) * c.actor.vocab * b + copy
                         + 16 * min(ENTROPY_CHUNK, n * t) * c.actor.vocab),
        "score_pass": max(_forward_peak(s, b, n * seq) for s in scorers),
        "generation": c.kv_cache_gb * GB if c.kv_cache_gb is not None else float(kv),
    }
    return Estimate(c, params, resident, phases)


def format_table(est: Estimate) -> str:
    """The per-component table, GB per GPU."""
    c = est.config
    shapes = c.shapes()

    def describe(name: str) -> str:
        s = shapes[name]
        return "—" if s is None else f"{s.name} ({est.params[name] / 1e9:.3g}B)"

    critics = MODES[c.mode]
    head = [
        f"per-GPU memory of a {c.mode} step: ZeRO-{c.zero_stage} on {c.world_size} GPU(s), {c.dtype}"
        + (" (fp32 master weights + Adam)" if c.b == 2 else " (Adam)")
        + (f", offload {c.offload}" if c.offload != "none" else "") + f", {c.logprobs} log-probs",
        f"  models: actor + reference {describe('actor')}, reward {describe('reward')}, cost {describe('cost')}, "
        f"{critics} critic(s) {describe('reward_critic')}",
        f"  micro-batch {c.micro_batch} × {c.seq_len} tokens (response {c.n_response}), rollout batch {c.n_rollout}, "
        f"gradient checkpointing {'on' if c.gradient_checkpointing else 'off'}",
        "",
        f"{'component':<50}{'GB/GPU':>9}",
        "resident",
    ]
    rows = [f"  {LABELS[k]:<48}{v / GB:>9.2f}" for k, v in est.resident.items()]
    rows.append(f"  {'= resident':<48}{sum(est.resident.values()) / GB:>9.2f}")
    rows.append("phases (one at a time: the largest counts)")
    for k, v in est.phases.items():
        mark = "  <- peak" if k == est.peak_phase else ""
        rows.append(f"  {LABELS[k]:<48}{v / GB:>9.2f}{mark}")
    verdict = (f"fits: {est.margin / GB:.2f} GB to spare" if est.fits
               else f"does not fit: {-est.margin / GB:.2f} GB over")
    tail = [f"{'total (resident + peak phase)':<50}{est.total / GB:>9.2f}",
            f"{'capacity (--gpu-memory)':<50}{c.gpu_memory:>9.2f}", verdict]
    return "\n".join(head + rows + tail)


_DIMS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "head_dim")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saferlhf bench memory",
        description="Predict the per-GPU memory of a PPO-Lagrangian step and whether it fits. "
                    "Exit status: 0 fits, 1 does not fit, 2 bad input.",
        epilog=f"presets: {', '.join(PRESETS)}. Formulas: the docstring of saferlhf/memory.py.",
    )
    shape = parser.add_argument_group("actor shape (a preset, a config.json, or explicit sizes overriding either)")
    shape.add_argument("--model", metavar="NAME", help="preset name of the actor (and, by default, of every model)")
    shape.add_argument("--hf-config", metavar="PATH", help="a transformers config.json (or its checkpoint directory)")
    for name in _DIMS:
        shape.add_argument(_flag(name), type=int, dest=name, metavar="N")
    others = parser.add_argument_group("other models (a preset or a config.json; default: the actor's shape)")
    others.add_argument("--reward-model", metavar="SPEC", help="reward model shape")
    others.add_argument("--cost-model", metavar="SPEC", help="cost model shape")
    others.add_argument("--critic-model", metavar="SPEC",
                        help="both critics' shape (default: the reward and cost models')")
    run = parser.add_argument_group("training")
    run.add_argument("--mode", default="ppo_lag", help="ppo_lag (2 critics), ppo or ppo_rs (1 critic)")
    run.add_argument("--no-cost-model", action="store_true", help="ppo without a cost model")
    run.add_argument("--zero-stage", type=int, metavar="N", default=3, help="ZeRO stage 0-3 (default 3)")
    run.add_argument("--world-size", type=int, metavar="N", default=1, help="GPUs (default 1)")
    run.add_argument("--offload", default="none", help="none, optimizer or all (parameters too, stage 3)")
    run.add_argument("--dtype", default="bf16", help="bf16 or fp16 (mixed precision, fp32 master) or fp32")
    run.add_argument("--micro-batch", type=int, metavar="N", default=8,
                     help="sequences per backward (ppo.mini_batch_size; default 8)")
    run.add_argument("--rollout-batch", type=int, metavar="N",
                     help="sequences scored at once per GPU (default: the micro-batch)")
    run.add_argument("--seq-len", type=int, metavar="N", default=512, help="prompt + response tokens (default 512)")
    run.add_argument("--response-len", type=int, metavar="N", help="response tokens (default: the whole sequence)")
    run.add_argument("--gradient-checkpointing", action="store_true")
    run.add_argument("--logprobs", default="fused", help="fused (Triton kernel, default) or reference")
    gpu = parser.add_argument_group("device")
    gpu.add_argument("--kv-cache-gb", type=float, metavar="GB",
                     help="generation memory, e.g. a vLLM pool (default: HF generate's KV cache)")
    gpu.add_argument("--gpu-memory", type=float, metavar="GB", default=80.0, help="capacity in GB (default 80)")
    gpu.add_argument("--overhead-gb", type=float, metavar="GB", default=1.0,
                     help="CUDA context, NCCL, fragmentation (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return parser


def config_from_args(args: argparse.Namespace) -> MemoryConfig:
    """The MemoryConfig the flags describe; MemoryModelError names the flag at fault."""
    if args.model and args.hf_config:
        raise MemoryModelError("give --model or --hf-config, not both")
    given = {name: getattr(args, name) for name in _DIMS if getattr(args, name) is not None}
    for name, value in given.items():
        if value <= 0:
            raise MemoryModelError(f"{_flag(name)} must be a positive integer, got {value}")
    if args.model:
        if args.model not in PRESETS:
            raise MemoryModelError(f"--model: unknown preset {args.model!r}; presets: {', '.join(PRESETS)}")
        actor = PRESETS[args.model]
    elif args.hf_config:
        actor = shape_from_hf_config(args.hf_config)
    else:
        missing = [_flag(n) for n in ("hidden", "layers", "heads", "intermediate", "vocab") if n not in given]
        if missing:
            raise MemoryModelError("give --model NAME, --hf-config PATH or explicit sizes "
                                   f"(missing {', '.join(missing)})")
        given.setdefault("kv_heads", given["heads"])
        actor = ModelShape(**given)
        given = {}
    if given:
        actor = replace(actor, **given, name=f"{actor.name} (modified)")
    return MemoryConfig(
        actor=actor,
        reward=resolve_shape(args.reward_model, "--reward-model") if args.reward_model else None,
        cost=resolve_shape(args.cost_model, "--cost-model") if args.cost_model else None,
        critic=resolve_shape(args.critic_model, "--critic-model") if args.critic_model else None,
        mode=args.mode, cost_model=not args.no_cost_model, zero_stage=args.zero_stage, world_size=args.world_size,
        offload=args.offload, dtype=args.dtype, micro_batch=args.micro_batch, rollout_batch=args.rollout_batch,
        seq_len=args.seq_len, response_len=args.response_len, gradient_checkpointing=args.gradient_checkpointing,
        logprobs=args.logprobs, kv_cache_gb=args.kv_cache_gb, gpu_memory=args.gpu_memory,
        overhead_gb=args.overhead_gb,
    )


def main(argv: list[str] | None = None) -> int:
    """``saferlhf bench memory``: 0 fits, 1 does not fit, 2 bad input."""
    args = build_parser().parse_args(argv)
    try:
        est = estimate(config_from_args(args))
    except MemoryModelError as e:
        print(f"saferlhf bench memory: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict()) if args.json else format_table(est))
    return 0 if est.fits else 1


__all__ = ["PRESETS", "Estimate", "MemoryConfig", "MemoryModelError", "ModelShape", "estimate", "format_table",
           "main", "shape_from_hf_config"]

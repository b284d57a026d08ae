"""One dataclass tree for every stage: defaults in code, YAML presets, dotted overrides.

A preset (``configs/*.yaml``) holds the sections below at its top level plus an optional
``stages:`` mapping whose entries (``sft``, ``rm``, ``cm``, ``ppo_lag`` ...) override the top level
for that stage only, so one file describes a whole hardware/model setting. Resolution order:
code defaults → preset top level → ``stages.<stage>`` → command-line ``key=value`` overrides.

Unknown keys and values of the wrong type are errors that name the dotted key. The resolved tree
is written to every run directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("sft", "rm", "cm", "ppo_lag", "ppo", "ppo_rs", "grpo_lag", "rloo_lag", "grpo", "rloo", "dpo", "eval",
          "round")
# The critic-free stages: advantages from each prompt's group of rollout.samples_per_prompt answers.
GROUP_STAGES = ("grpo_lag", "rloo_lag", "grpo", "rloo")
KL_PLACEMENTS = ("auto", "loss", "reward")  # ppo.kl_in


class ConfigError(ValueError):
    """A preset or override that does not fit the config tree (names the dotted key)."""


def _f(default: Any, help: str) -> Any:  # noqa: A002 - `help` reads best at the call sites
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    out_dir: str = _f("", "run directory; empty means runs/<stage>")
    seed: int = _f(42, "global seed (data order, init, sampling)")
    max_steps: int = _f(-1, "stop after this many optimizer steps; -1 runs the configured epochs")
    log_every: int = _f(10, "log train metrics every N steps")
    eval_every: int = _f(0, "evaluate on the held-out split every N steps (0: only at the end)")
    save_every: int = _f(0, "checkpoint every N steps (0: only the final model)")
    keep_checkpoints: int = _f(2, "how many step checkpoints to keep (the final model is always kept)")
    resume: bool = _f(False, "resume from the newest checkpoint in out_dir/checkpoints")
    deterministic: bool = _f(False, "torch deterministic algorithms (bitwise-reproducible on CPU)")
    tensorboard: bool = _f(True, "write TensorBoard event files to out_dir/tensorboard")
    wandb: bool = _f(False, "also log to Weights & Biases (needs `wandb` installed and logged in)")
    progress: bool = _f(True, "show tqdm progress bars")
    profile: bool = _f(False, "PPO: torch.profiler trace of rank 0 from step 2 on -> out_dir/profile/")
    memory_snapshot: bool = _f(False, "PPO on CUDA: record the allocator history -> out_dir/profile/")
    verbose: bool = _f(False, "show what libraries print (the vLLM engine's log, transformers' loading reports and "
                              "progress bars) on the console; otherwise the engine writes to engine-rank<r>.log in "
                              "the run directory and the others are quiet")
    threads: int = _f(0, "CPU threads per rank for torch and the native ops (0: the cores this process may use "
                         "divided by the ranks on this machine, capped by OMP_NUM_THREADS where set); never "
                         "more than that")


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "HF checkpoint (directory or hub id) to start from")
    tokenizer: str = _f("", "tokenizer path; empty means name_or_path")
    dtype: str = _f("float32", "weights dtype: float32, bfloat16 or float16")
    max_length: int = _f(512, "max tokens of prompt + response")
    chat_template: bool = _f(False, "use the tokenizer's chat template instead of the paper's template")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass")
    fused_layers: bool = _f(True, "RMSNorm and SwiGLU of Llama-family models through saferlhf.ops (fused kernels)")
    compile_layers: bool | str = _f("auto", "torch.compile the decoder layers: auto (CUDA at ZeRO 0-2), true or false")
    trust_remote_code: bool = _f(False, "allow custom modelling code from the checkpoint")
    response_logits: bool = _f(True, "log-prob passes run the LM head over the response positions only, without a "
                                     "KV cache; false: over every position with the model's default cache, as the "
                                     "original safe-rlhf (the same numbers, more work)")
    packing: bool = _f(True, "padding-free passes: a batch's sequences concatenated into one row, attention per "
                             "sequence (flash-attn varlen / torch varlen on GPU, per-sequence sdpa on CPU); models "
                             "that cannot pack run padded with one warning")


@dataclass
class DataConfig:
    train: list[str] = _f([], "training datasets, each NAME[:PROPORTION[:PATH]]")
    eval: list[str] = _f([], "held-out datasets; empty means split eval_split off the training mix")
    eval_split: float = _f(0.0, "fraction of the training mix held out when `eval` is empty")
    ptx: list[str] = _f([], "SFT datasets for the PPO ptx loss (empty: no ptx term)")
    strict: bool = _f(False, "turn skipped rows (identical responses, contradictory labels) into errors")
    categories: list[str] = _f([], "cm only: the harm categories this cost model learns; a response counts as unsafe "
                                   "when its response_{0,1}_harm_category marks it harmful in any of them (empty: "
                                   "the rows' own safety labels)")


@dataclass
class OptimConfig:
    lr: float = _f(2e-5, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_betas: list[float] = _f([0.9, 0.95], "AdamW betas")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    lr_scheduler: str = _f("cosine", "cosine, linear or constant (all after a linear warm-up)")
    warmup_ratio: float = _f(0.03, "fraction of the steps spent warming up")
    epochs: int = _f(1, "passes over the training data")
    micro_batch_size: int = _f(8, "sequences (pairs for rm/cm) per rank per forward")
    gradient_accumulation: int = _f(1, "micro-batches per optimizer step")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 disables)")
    micro_batch_tokens: int = _f(0, "token budget of one forward/backward pass (0: micro_batch_size sequences per "
                                    "pass); the step's batch is cut into passes of at most this many tokens "
                                    "(packed: real tokens, padded: rows × padded length) and the loss normalised "
                                    "over the whole step; also the PPO PTX passes")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(0, "ZeRO stage 0-3")
    offload: str = _f("none", "none, optimizer or all (parameters too, stage 3) - offload to CPU memory")
    bf16: bool = _f(False, "bf16 mixed precision")
    fp16: bool = _f(False, "fp16 mixed precision with loss scaling")
    backend: str = _f("", "process-group backend; empty picks nccl on GPU, gloo on CPU")


@dataclass
class ScoreConfig:
    regularization: float = _f(0.001, "reg in reg*mean(s_w^2 + s_l^2)/2 of the reward/cost loss")
    normalize: bool = _f(False, "normalise end scores with the running mean/variance")
    histogram_bins: int = _f(40, "bins of the score histograms written to plots/")


@dataclass
class PPOConfig:
    reward_model: str = _f("", "reward model directory (a saved ScoreModel)")
    cost_model: str = _f("", "cost model directory (a saved ScoreModel); optional for `ppo`")
    reward_critic: str = _f("", "reward critic init; empty: the reward model (or the actor, see critic_init)")
    cost_critic: str = _f("", "cost critic init; empty: the cost model (or the actor, see critic_init)")
    critic_init: str = _f("score_model", "where empty critic paths start from: score_model or actor")
    critic_lr: float = _f(5e-6, "critic learning rate (the actor uses optim.lr)")
    critic_weight_decay: float = _f(0.0, "critic AdamW weight decay")
    rollout_batch_size: int = _f(16, "prompts per rank per step")
    mini_batch_size: int = _f(16, "sequences per rank per optimizer step in the update epochs")
    update_epochs: int = _f(1, "passes over each step's experience")
    kl_coeff: float = _f(0.01, "beta: KL penalty added to the reward stream (and subtracted from cost)")
    kl_in: str = _f("auto", "where the KL to the reference enters: reward (beta*KL shaped into the reward and cost "
                            "streams, the PPO way), loss (beta*k3 KL term in the actor loss, the GRPO way) or auto "
                            "(loss for grpo, rloo, grpo_lag, rloo_lag; reward for ppo, ppo_lag, ppo_rs)")
    gamma: float = _f(1.0, "discount")
    gae_lambda: float = _f(0.95, "GAE lambda")
    clip_ratio: float = _f(0.2, "PPO ratio clip epsilon")
    clip_value: float = _f(5.0, "critic value clip")
    clip_score: float = _f(50.0, "shaped per-token reward/cost clip")
    ptx_coeff: float = _f(16.0, "weight of the SFT (ptx) loss; used when data.ptx is set")
    shaping_lambda: float = _f(1.0, "fixed lambda of reward shaping (ppo_rs): reward R - lambda*C")
    total_steps: int = _f(100, "PPO steps (one rollout + update each); run.max_steps caps it too")
    micro_batch_tokens: int = _f(0, "token budget of one pass in scoring and updates (0: one pass over the whole "
                                    "rollout / mini-batch); gradients accumulate over a mini-batch's passes")


@dataclass
class LagrangeConfig:
    method: str = _f("gradient", "gradient (the paper: ascent on log lambda) or pid")
    lambda_init: float = _f(1.0, "initial lambda")
    lr: float = _f(0.1, "lambda learning rate (gradient method)")
    lambda_max: float = _f(5.0, "upper bound of lambda")
    threshold: float = _f(0.0, "d: the cost limit J_C <= d")
    delay: int = _f(0, "steps before lambda starts to move")
    window: int = _f(128, "episodes in the J_C moving window")
    kp: float = _f(0.1, "PID proportional gain")
    ki: float = _f(0.01, "PID integral gain")
    kd: float = _f(0.0, "PID derivative gain")
    constraint: str = _f("mean_cost", "what J_C <= d constrains: mean_cost (the paper: E[C] <= d, d in score units), "
                                      "unsafe_rate (P(C > 0) <= d, d in [0, 1]) or rectified (E[max(C, 0)] <= d: "
                                      "safe answers do not offset unsafe ones)")
    cost_temperature: float = _f(1.0, "unsafe_rate: tau of the cost stream's sigma(C / tau)")
    constraints: list[str] = _f([], "names of per-category constraints (grpo_lag, rloo_lag), each with its own cost "
                                    "model (lagrange.cost_models), threshold (lagrange.thresholds) and lambda; "
                                    "A = (A_r - sum_k lambda_k A_c,k) / (1 + sum_k lambda_k). Empty: one constraint, "
                                    "ppo.cost_model under lagrange.threshold")
    cost_models: list[str] = _f([], "with lagrange.constraints: one cost model per constraint, in its order (e.g. "
                                    "trained by `saferlhf cm data.categories=[...]`)")
    thresholds: list[float] = _f([], "with lagrange.constraints: d_k of each constraint, in its order")


@dataclass
class RolloutConfig:
    backend: str = _f("auto", "generation backend: vllm, hf (transformers generate on the actor), "
                              "or auto (vllm where it imports, else hf)")
    max_new_tokens: int = _f(128, "response length cap")
    temperature: float = _f(1.0, "sampling temperature (also used for the log-probs)")
    top_p: float = _f(1.0, "nucleus sampling")
    top_k: int = _f(0, "top-k sampling (0: off)")
    repetition_penalty: float = _f(1.0, "repetition penalty")
    samples_per_prompt: int = _f(1, "responses sampled per prompt (the group size of grpo, rloo, grpo_lag, rloo_lag: "
                                    ">= 2)")
    verify_sync: bool = _f(False, "check every weight sync against the actor on probe prompts")
    verify_prompts: int = _f(4, "probe prompts of verify_sync (the first ones of the prompt set)")
    verify_tolerance: float = _f(1e-3, "verify_sync: largest |engine - actor| log-prob accepted")
    check_weights: bool = _f(True, "vllm: after every sync, compare what each engine layer computes on probe "
                                   "inputs with the actor's weights (cheap)")
    check_tolerance: float = _f(0.0, "check_weights: largest relative error accepted (0: by dtype, 1e-4 in fp32)")
    on_verify_failure: str = _f("restart", "a failed check_weights/verify_sync: restart (rebuild the engine from "
                                           "the actor's full weights, check again, stop if it still fails), "
                                           "stop or warn")
    kv_cache_mb: int = _f(256, "vllm: KV-cache memory of the engine, MiB per rank")
    tensor_parallel_size: int = _f(1, "vllm: ranks one engine spans (under torchrun/deepspeed)")
    sync_bucket_mb: int = _f(256, "vllm: weight sync bucket size, MiB (whole decoder layers per bucket)")
    sync_method: str = _f("auto", "vllm: weight push path, reload (CPU), load_weights (GPU) or auto")
    enable_sleep: bool = _f(False, "vllm on GPU: sleep the engine during training phases (colocation)")
    synthetic_lengths: str = _f("", "benchmarks only: cut every sampled response to a length drawn from "
                                    "uniform:LOW:HIGH or fixed:N (the untrained models of `saferlhf bench step` "
                                    "never end their answers); empty: off")


@dataclass
class DPOConfig:
    beta: float = _f(0.1, "beta: temperature of the implicit reward beta*(log pi - log pi_ref)")
    label: str = _f("better", "which response is chosen: better (helpfulness) or safer (harmlessness)")


@dataclass
class Config:
    stage: str = _f("sft", "the stage this tree was resolved for")
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    lagrange: LagrangeConfig = field(default_factory=LagrangeConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir or f"runs/{self.stage}")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    """Write a nested mapping into a dataclass instance, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{dotted}' (known here: {close})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=1e-5", "data.train=[a, b]"]`` → nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from e
        _set_dotted(tree, key, value)
    return tree


def load_preset(path: str | Path, stage: str) -> dict:
    """Read a preset file and flatten its ``stages.<stage>`` section over the top level."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    stages = raw.pop("stages", {}) or {}
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"{path}: unknown stage(s) under 'stages': {sorted(unknown)} (known: {STAGES})")
    merged = _deep_merge(raw, stages.get(stage, {}) or {})
    return merged


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(
    stage: str, preset: str | Path | None = None, overrides: list[str] | None = None, cls: type = Config
) -> Any:
    """Resolve the config tree of ``stage``: defaults → preset → stage section → overrides."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}' (known: {', '.join(STAGES)})")
    cfg = cls()
    if preset:
        _apply(cfg, load_preset(preset, stage))
    if overrides:
        _apply(cfg, parse_overrides(overrides))
    if isinstance(cfg.model.compile_layers, str) and cfg.model.compile_layers.strip().lower() != "auto":
        raise ConfigError(f"config key 'model.compile_layers': expected auto, true or false, "
                          f"got {cfg.model.compile_layers!r}")
    if cfg.model.compile_layers is True and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("model.compile_layers=true does not work with deepspeed.zero_stage=3 (its parameter "
                          "gathering runs in hooks inside the compiled layers): use auto (which skips it) or false")
    if cfg.rollout.synthetic_lengths:
        from saferlhf.rollout.base import parse_lengths

        try:
            parse_lengths(cfg.rollout.synthetic_lengths)
        except ValueError as e:
            raise ConfigError(f"config key 'rollout.synthetic_lengths': {e}") from None
    lg = cfg.lagrange
    from saferlhf.algorithms.constraints import CONSTRAINTS

    if lg.constraint not in CONSTRAINTS:
        raise ConfigError(f"config key 'lagrange.constraint': expected one of {', '.join(CONSTRAINTS)}, "
                          f"got {lg.constraint!r}")
    if lg.constraint == "unsafe_rate" and not 0.0 <= lg.threshold <= 1.0:
        raise ConfigError(f"config key 'lagrange.threshold': with lagrange.constraint=unsafe_rate it is the largest "
                          f"share of unsafe answers, in [0, 1]; got {lg.threshold}")
    if lg.constraint == "rectified" and lg.threshold < 0:
        raise ConfigError(f"config key 'lagrange.threshold': with lagrange.constraint=rectified the rectified cost "
                          f"is >= 0, so the threshold must be >= 0; got {lg.threshold}")
    if not lg.cost_temperature > 0:
        raise ConfigError(f"config key 'lagrange.cost_temperature': must be > 0, got {lg.cost_temperature}")
    _check_constraints(cfg, stage)
    if cfg.data.categories and stage != "cm":
        raise ConfigError(f"config key 'data.categories': only the cost model (cm) learns per harm category, "
                          f"not {stage}")
    if len(set(cfg.data.categories)) != len(cfg.data.categories) or not all(cfg.data.categories):
        raise ConfigError(f"config key 'data.categories': names must be non-empty and distinct, "
                          f"got {cfg.data.categories}")
    if cfg.run.threads < 0:
        raise ConfigError(f"config key 'run.threads': must be >= 0 (0: automatic), got {cfg.run.threads}")
    for key, value in (("ppo.micro_batch_tokens", cfg.ppo.micro_batch_tokens),
                       ("optim.micro_batch_tokens", cfg.optim.micro_batch_tokens)):
        if value < 0:
            raise ConfigError(f"config key '{key}': must be >= 0 (0: no token budget), got {value}")
    if cfg.rollout.on_verify_failure not in ("restart", "stop", "warn"):
        raise ConfigError(f"config key 'rollout.on_verify_failure': expected restart, stop or warn, "
                          f"got {cfg.rollout.on_verify_failure!r}")
    if cfg.ppo.kl_in not in KL_PLACEMENTS:
        raise ConfigError(f"config key 'ppo.kl_in': expected one of {', '.join(KL_PLACEMENTS)}, got {cfg.ppo.kl_in!r}")
    if cfg.rollout.samples_per_prompt < 1:
        raise ConfigError(f"config key 'rollout.samples_per_prompt': must be >= 1, "
                          f"got {cfg.rollout.samples_per_prompt}")
    if stage in GROUP_STAGES and cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(f"config key 'rollout.samples_per_prompt': {stage} compares each answer with the other "
                          f"answers to its prompt, so it needs at least 2 per prompt; got "
                          f"{cfg.rollout.samples_per_prompt}")
    if cfg.rollout.check_tolerance < 0:
        raise ConfigError(f"config key 'rollout.check_tolerance': must be >= 0, got {cfg.rollout.check_tolerance}")
    cfg.stage = stage
    return cfg


# The stages that take several constraints (lagrange.constraints): their advantage needs no critic, so
# K constraints cost K frozen cost models; in ppo_lag each would also need a trained cost critic.
MULTI_CONSTRAINT_STAGES = ("grpo_lag", "rloo_lag")


def _check_constraints(cfg: Any, stage: str) -> None:
    """``lagrange.constraints`` and its parallel lists: one cost model and one threshold per name."""
    lg = cfg.lagrange
    if not (lg.constraints or lg.cost_models or lg.thresholds):
        return
    if not lg.constraints:
        raise ConfigError("config keys 'lagrange.cost_models' / 'lagrange.thresholds' are set but "
                          "'lagrange.constraints' is empty: name each constraint")
    if len(set(lg.constraints)) != len(lg.constraints) or not all(lg.constraints):
        raise ConfigError(f"config key 'lagrange.constraints': names must be non-empty and distinct, "
                          f"got {lg.constraints}")
    for key, values in (("lagrange.cost_models", lg.cost_models), ("lagrange.thresholds", lg.thresholds)):
        if len(values) != len(lg.constraints):
            raise ConfigError(f"config key '{key}': {len(values)} entries for {len(lg.constraints)} constraints "
                              f"{lg.constraints}; give one per constraint, in the same order")
    if stage not in MULTI_CONSTRAINT_STAGES:
        raise ConfigError(f"config key 'lagrange.constraints': {stage} takes one constraint (ppo.cost_model, "
                          f"lagrange.threshold); several run in {', '.join(MULTI_CONSTRAINT_STAGES)}")
    if cfg.ppo.cost_model:
        raise ConfigError("config key 'ppo.cost_model': with lagrange.constraints the cost models are "
                          "lagrange.cost_models; leave ppo.cost_model empty")
    for name, threshold in zip(lg.constraints, lg.thresholds):
        if lg.constraint == "unsafe_rate" and not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"config key 'lagrange.thresholds': constraint {name!r} under unsafe_rate is a share of "
                              f"unsafe answers, in [0, 1]; got {threshold}")
        if lg.constraint == "rectified" and threshold < 0:
            raise ConfigError(f"config key 'lagrange.thresholds': constraint {name!r} under rectified must be >= 0; "
                              f"got {threshold}")


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


def load_config_file(path: str | Path, cls: type = Config) -> Any:
    """Load a resolved ``config.yaml`` written by :func:`save_config`."""
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    cfg = cls()
    _apply(cfg, data)
    return cfg


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """One line per leaf key: ``dotted.key = default  # help`` (used by ``--help``)."""
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines.extend(describe(value, f"{prefix}{f.name}."))
        elif f.name != "stage":
            lines.append(f"  {prefix}{f.name} = {value!r}  # {f.metadata.get('help', '')}")
    return lines


def resolve_preset(name_or_path: str) -> Path:
    """A preset file path, or the name of a shipped preset (``tiny-cpu`` → configs/tiny-cpu.yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    from importlib import resources

    shipped = resources.files("saferlhf.configs") / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"config file not found: {name_or_path} (neither a path nor a shipped preset)")

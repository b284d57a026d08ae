"""One PPO-Lagrangian step, phase by phase: the original design's ops (baseline) against the fused ops.

Usage:

    python benchmarks/bench_plain_step.py                 # tiny Llama on this machine's device
    python benchmarks/bench_plain_step.py --model gpu     # ~0.5B Llama, 128k vocabulary (needs a GPU)

Both configurations run on the same models (restored to the same weights before each), the same
prompts and the same rollout, one after the other in one process:

- ``baseline``: the reference ops (``SAFERLHF_OPS=reference``), as the original safe-rlhf code
  computes a step: the LM head over every position, log-probs from float32-upcast logits through
  ``log_softmax`` and ``gather``, the per-token Python GAE loop, and transformers' own RMSNorm and
  MLP gate (float32 copies of the activations, SiLU and the product as separate ops);
- ``saferlhf``: the dispatcher's default — fused Triton kernels on CUDA, native C++ ops on CPU — with
  everything the trainer does on top: the LM head over the response positions only, without a KV
  cache (``passes.response_logprobs``), the fused RMSNorm and SwiGLU layers (``saferlhf.models.fused``)
  and, where the trainer's ``model.compile_layers=auto`` turns it on (CUDA), the decoder layers
  compiled (``saferlhf.models.compiled``; ``--compile`` overrides).

``--ablation`` adds configurations between them: ``fused-ops`` (the fused log-probs, shaping and GAE
only), ``+response-logits`` (and the LM head over the response only) and, when ``saferlhf`` compiles,
``+fused-layers`` (everything but the compilation), so that each lever's share of the gain is
measured in the same run. The first (warm-up) step of a compiling configuration includes the
compilation; its training time is reported as ``warmup_training_s``.

Generation (HF ``generate`` on the actor, the ``hf`` rollout backend) is the same for both and runs
once. The configurations alternate over rounds (see ``measure``); phases, timed after a warm-up step:

- ``score``: actor and reference log-prob passes, reward and cost end scores, both critics' values;
- ``experience``: KL shaping and both GAEs (``shape_rewards`` + ``dual_gae``);
- ``actor``: PPO update of the actor over the mini-batches (forward, clipped loss, backward, AdamW);
- ``critics``: the same for the reward and cost critics.

Peak memory is measured (CUDA) for the actor's log-prob pass of the score phase and for one actor
mini-batch update, beyond what was allocated before it. The models use plain torch (no DeepSpeed),
so the script runs wherever torch, triton and transformers are installed. Prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import import_saferlhf  # noqa: E402

import_saferlhf()

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from saferlhf import ops  # noqa: E402
from saferlhf.algorithms import policy_loss, value_loss  # noqa: E402
from saferlhf.models.compiled import compile_layers, resolve_compile_layers, uncompile_layers  # noqa: E402
from saferlhf.models.fused import unuse_fused_layers, use_fused_layers  # noqa: E402
from saferlhf.models.passes import mean_entropy, response_logprobs, response_values  # noqa: E402
from saferlhf.models.score_model import ScoreModel  # noqa: E402
from saferlhf.models.tiny import BENCHMARK_VOCAB, TINY_SIZES  # noqa: E402

PHASES = ("score", "experience", "actor", "critics")

# Llama shapes: saferlhf.models.tiny's, with the vocabulary each is benchmarked with ("gpu": Llama 3's
# 128,256 tokens, which dominate the log-prob passes).
MODELS = {name: {**TINY_SIZES[name], "vocab_size": BENCHMARK_VOCAB[name]} for name in ("tiny", "20m", "gpu")}


@dataclass(frozen=True)
class StepShape:
    """The rollout and update sizes of the step."""

    rollout: int = 8  # N sequences
    prompt_len: int = 16  # P
    response_len: int = 16  # T (generation runs to exactly T tokens)
    mini_batch: int = 4
    temperature: float = 1.0
    kl_coeff: float = 0.1
    clip_score: float = 5.0
    lagrange_lambda: float = 1.0


SHAPES = {
    "tiny": StepShape(),
    "20m": StepShape(rollout=16, prompt_len=32, response_len=64, mini_batch=8),
    "gpu": StepShape(rollout=32, prompt_len=128, response_len=512, mini_batch=8),
}


@dataclass(frozen=True)
class Levers:
    """One configuration: the ops backend (None: the dispatcher's default) and the trainer's levers."""

    ops: str | None
    fused_layers: bool = True
    response_logits: bool = True
    compile_layers: bool = False


CONFIGS = {"baseline": Levers("reference", False, False), "saferlhf": Levers(None, compile_layers=True)}
ABLATIONS = {"fused-ops": Levers(None, False, False), "+response-logits": Levers(None, False, True),
             "+fused-layers": Levers(None)}


@contextlib.contextmanager
def levers(config: Levers, modules: list[torch.nn.Module]):
    """The configuration's op backend (SAFERLHF_OPS) and layer levers for the duration.

    With ``fused_layers`` the models' RMSNorm and gate run through ``saferlhf.ops``
    (``use_fused_layers``), otherwise transformers' own modules compute. With ``compile_layers`` the
    decoder layers of ``modules`` run compiled (one compiled function for all, cached across
    configurations and rounds). ``response_logits`` is an argument of the passes (``one_step``).
    """
    for module in modules:
        (use_fused_layers if config.fused_layers else unuse_fused_layers)(module)
    if config.compile_layers:
        for module in modules:
            compile_layers(module)
    try:
        with ops_backend(config.ops):
            yield
    finally:
        for module in modules:
            uncompile_layers(module)
            unuse_fused_layers(module)


@contextlib.contextmanager
def ops_backend(name: str | None):
    """SAFERLHF_OPS set to ``name`` (None: the dispatcher's default) for the duration."""
    old = os.environ.pop("SAFERLHF_OPS", None)
    if name is not None:
        os.environ["SAFERLHF_OPS"] = name
    try:
        yield
    finally:
        os.environ.pop("SAFERLHF_OPS", None)
        if old is not None:
            os.environ["SAFERLHF_OPS"] = old


class Clock:
    """Wall time of a region, the device queue drained at both ends."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host-device sync: the region's work is done

    @contextlib.contextmanager
    def region(self, out: dict, key: str):
        self.sync()
        begin = time.perf_counter()
        yield
        self.sync()
        out[key] = out.get(key, 0.0) + time.perf_counter() - begin


@contextlib.contextmanager
def peak_extra(device: torch.device, out: dict, key: str):
    """Records in ``out[key]`` the peak bytes allocated in the region beyond those before it (CUDA only)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield
    torch.cuda.synchronize(device)
    out[key] = torch.cuda.max_memory_allocated(device) - before


class Models:
    """Actor, reference, reward, cost and the two critics, all of one Llama shape, on one device."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
        config = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **MODELS[model])
        self.config = config
        torch.manual_seed(seed)
        with torch.device(device):
            self.actor = LlamaForCausalLM(config).to(dtype)
            self.reward = ScoreModel.from_config(config, kind="reward", dtype=dtype)
            self.cost = ScoreModel.from_config(config, kind="cost", dtype=dtype)
        self.ref = copy.deepcopy(self.actor).eval().requires_grad_(False)
        self.reward.eval().requires_grad_(False)
        self.cost.eval().requires_grad_(False)
        self.critic_r = copy.deepcopy(self.reward).requires_grad_(True)
        self.critic_c = copy.deepcopy(self.cost).requires_grad_(True)
        self.trained = {"actor": self.actor, "critic_r": self.critic_r, "critic_c": self.critic_c}
        self.all = [self.actor, self.ref, self.reward, self.cost, self.critic_r, self.critic_c]
        self.initial = {name: copy.deepcopy(m.state_dict()) for name, m in self.trained.items()}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.reset()
        self.parameters = sum(p.numel() for p in self.actor.parameters())

    def reset(self) -> None:
        """Trained models back to their initial weights, with fresh AdamW states."""
        for name, module in self.trained.items():
            module.load_state_dict(self.initial[name])
            module.train()
            fused = next(module.parameters()).device.type == "cuda"
            self.optimizers[name] = torch.optim.AdamW(module.parameters(), lr=1e-6, fused=fused or None)


def rollout(models: Models, shape: StepShape, device: torch.device, seed: int = 0) -> dict:
    """Random left-padded prompts and HF-sampled responses of exactly T tokens: (N, P + T)."""
    generator = torch.Generator().manual_seed(seed)
    n, p, t = shape.rollout, shape.prompt_len, shape.response_len
    vocab = models.config.vocab_size
    prompt = torch.randint(3, vocab, (n, p), generator=generator)
    prompt_mask = torch.ones(n, p, dtype=torch.long)
    pad = torch.randint(0, p // 2, (n,), generator=generator)  # left padding of each prompt
    for row, k in enumerate(pad.tolist()):
        prompt_mask[row, :k] = 0
        prompt[row, :k] = 0
    models.actor.eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = models.actor.generate(
            input_ids=prompt.to(device), attention_mask=prompt_mask.to(device), do_sample=True,
            temperature=shape.temperature, max_new_tokens=t, min_new_tokens=t, eos_token_id=None,
            pad_token_id=0, use_cache=True,
        )
    models.actor.train()
    attention_mask = torch.cat([prompt_mask.to(device), torch.ones(n, t, dtype=torch.long, device=device)], dim=1)
    mask = torch.ones(n, t, device=device)
    mask[0::3, t * 3 // 4 :] = 0  # some responses end early (their tail is padding)
    attention_mask[:, p:] = mask.long()
    return {"sequences": out, "attention_mask": attention_mask, "mask": mask, "prompt_len": p}


def one_step(models: Models, batch: dict, shape: StepShape, clock: Clock, device: torch.device,
             full_head: bool = False) -> dict:
    """Score, make experience, update actor and critics once; returns seconds per phase, peaks, losses.

    ``full_head``: the log-prob passes run the LM head over every position (the original's), not only the
    response's (``Levers.response_logits`` off)."""
    out: dict = {}
    seq, attn, mask, plen = batch["sequences"], batch["attention_mask"], batch["mask"], batch["prompt_len"]
    with clock.region(out, "score"), torch.no_grad():
        models.actor.eval()
        with peak_extra(device, out, "peak_actor_logprob_pass"):
            logp_old, logits = response_logprobs(models.actor, seq, attn, plen, shape.temperature,
                                                 full_head=full_head)
            del logits
        logp_ref, logits = response_logprobs(models.ref, seq, attn, plen, shape.temperature, full_head=full_head)
        out["entropy"] = mean_entropy(logits, mask, shape.temperature).item()
        del logits
        reward = models.reward(seq, attn).end_scores.float()
        cost = models.cost(seq, attn).end_scores.float()
        models.critic_r.eval()
        models.critic_c.eval()
        values_r = response_values(models.critic_r, seq, attn, plen)
        values_c = response_values(models.critic_c, seq, attn, plen)
    with clock.region(out, "experience"):
        rewards, costs = ops.shape_rewards(logp_old, logp_ref, mask, reward, cost, shape.kl_coeff, shape.clip_score)
        lam = torch.tensor(shape.lagrange_lambda, device=device)
        _, ret_r, _, ret_c, adv = ops.dual_gae(rewards, costs, values_r, values_c, mask, 1.0, 0.95, lam)
    losses: dict[str, list[float]] = {"actor": [], "critic_r": [], "critic_c": []}
    for module in models.trained.values():
        module.train()
    batches = [slice(i, i + shape.mini_batch) for i in range(0, seq.shape[0], shape.mini_batch)]
    for k, rows in enumerate(batches):
        with clock.region(out, "actor"):
            region = peak_extra(device, out, "peak_actor_update") if k == 0 else contextlib.nullcontext()
            with region:
                logp, _ = response_logprobs(models.actor, seq[rows], attn[rows], plen, shape.temperature,
                                            full_head=full_head)
                loss = policy_loss(logp, logp_old[rows], adv[rows], mask[rows], 0.2).loss
                loss.backward()
                models.optimizers["actor"].step()
                models.optimizers["actor"].zero_grad(set_to_none=True)
            losses["actor"].append(loss.item())
        with clock.region(out, "critics"):
            for name, old, returns in (("critic_r", values_r, ret_r), ("critic_c", values_c, ret_c)):
                values = response_values(models.trained[name], seq[rows], attn[rows], plen)
                loss = value_loss(values, old[rows], returns[rows], mask[rows], 0.2).loss
                loss.backward()
                models.optimizers[name].step()
                models.optimizers[name].zero_grad(set_to_none=True)
                losses[name].append(loss.item())
    out["losses"] = losses
    out["logp_old_mean"] = (logp_old * mask).sum().item() / mask.sum().item()
    return out


def measure(model: str = "tiny", device: str | None = None, steps: int = 2, fused: str | None = None,
            rounds: int = 2, ablation: bool = False, compile: str = "auto", shape: StepShape | None = None) -> dict:
    """Both configurations on one set of models, in ``rounds`` alternating rounds.

    Each round runs, per configuration: weights and optimizers reset, one warm-up step (Triton
    compiles on its first call), then ``steps`` timed steps. Each phase's figure is the median over
    all timed steps of its configuration; alternating the configurations spreads any drift of the
    machine (clocks, allocator state) over both. ``fused`` forces the backend of the saferlhf
    configuration (SAFERLHF_OPS); None: the dispatcher's default. ``compile``: whether the saferlhf
    configuration compiles its decoder layers, as ``model.compile_layers`` (auto: on CUDA).
    ``ablation`` adds the configurations of ``ABLATIONS`` (``+fused-layers`` only when saferlhf
    compiles: otherwise it is saferlhf). ``shape`` replaces the model's step shape (``SHAPES``).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shape = shape or SHAPES[model]
    clock = Clock(dev)
    begin = time.perf_counter()
    models = Models(model, dev, dtype)
    gen_out: dict = {}
    with clock.region(gen_out, "generate"):
        batch = rollout(models, shape, dev)
    tokens = shape.rollout * shape.response_len
    result: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "model": model,
        "parameters": models.parameters,
        "dtype": str(dtype)[6:],
        "shape": asdict(shape),
        "rounds": rounds,
        "timed_steps_per_round": steps,
        "generate_s": gen_out["generate"],
        "generate_tokens_per_s": tokens / gen_out["generate"],
        "configs": {},
    }
    compiled = resolve_compile_layers(compile, dev, zero_stage=0)
    result["compile_layers"] = compiled
    configs = dict(CONFIGS)
    if ablation:
        configs = {"baseline": CONFIGS["baseline"], **ABLATIONS, "saferlhf": CONFIGS["saferlhf"]}
        if not compiled:
            del configs["+fused-layers"]
    configs = {name: Levers(fused, c.fused_layers, c.response_logits, c.compile_layers and compiled)
               if c.ops is None else c for name, c in configs.items()}
    warmups: dict[str, dict] = {}
    timed: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(rounds):
        for config, chosen in configs.items():
            models.reset()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            with levers(chosen, models.all):
                result["configs"].setdefault(config, {"ops": ops.backend_for(batch["mask"]),
                                                      "compile_layers": chosen.compile_layers})
                full_head = not chosen.response_logits
                warmups.setdefault(config, one_step(models, batch, shape, clock, dev, full_head))
                timed[config] += [one_step(models, batch, shape, clock, dev, full_head) for _ in range(steps)]
    for config in configs:
        summary, runs, first = result["configs"][config], timed[config], warmups[config]
        summary.update({f"{phase}_s": statistics.median(run[phase] for run in runs) for phase in PHASES})
        summary["training_s"] = sum(summary[f"{phase}_s"] for phase in PHASES)
        summary["warmup_training_s"] = sum(first[phase] for phase in PHASES)
        summary["tokens_per_s"] = tokens / (summary["training_s"] + result["generate_s"])
        for key in ("peak_actor_logprob_pass", "peak_actor_update"):
            if key in runs[-1]:
                summary[f"{key}_gb"] = max(run[key] for run in runs) / 1e9
        # Values of the first (warm-up) step: both configurations start from the same weights.
        summary["first_step_losses"] = {name: values[0] for name, values in first["losses"].items()}
        summary["logp_old_mean"] = first["logp_old_mean"]
        summary["entropy"] = first["entropy"]
    base, fast = result["configs"]["baseline"], result["configs"]["saferlhf"]
    result["speedup"] = {phase: base[f"{phase}_s"] / fast[f"{phase}_s"] for phase in (*PHASES, "training")}
    result["speedup"]["step"] = fast["tokens_per_s"] / base["tokens_per_s"]
    result["training_speedup"] = {name: base["training_s"] / result["configs"][name]["training_s"]
                                  for name in configs if name != "baseline"}
    if "peak_actor_logprob_pass_gb" in base:
        result["memory_ratio"] = {key: base[f"{key}_gb"] / fast[f"{key}_gb"]
                                  for key in ("peak_actor_logprob_pass", "peak_actor_update")}
    result["seconds"] = time.perf_counter() - begin
    return result


def format_table(result: dict) -> str:
    base, fast = result["configs"]["baseline"], result["configs"]["saferlhf"]
    lines = [f"{result['model']} Llama, {result['parameters'] / 1e6:.1f}M parameters, {result['dtype']}, "
             f"{result['device']}; rollout {result['shape']['rollout']} × (P={result['shape']['prompt_len']} + "
             f"T={result['shape']['response_len']}); generate (hf, shared) {result['generate_s']:.2f} s",
             f"{'phase':<12}{'baseline (' + base['ops'] + ')':>22}{'saferlhf (' + fast['ops'] + ')':>22}{'ratio':>9}"]
    for phase in (*PHASES, "training"):
        lines.append(f"{phase:<12}{base[phase + '_s'] * 1e3:>19.1f} ms{fast[phase + '_s'] * 1e3:>19.1f} ms"
                     f"{result['speedup'][phase]:>8.2f}×")
    lines.append(f"{'step tok/s':<12}{base['tokens_per_s']:>22.1f}{fast['tokens_per_s']:>22.1f}"
                 f"{result['speedup']['step']:>8.2f}×")
    for key in ("peak_actor_logprob_pass", "peak_actor_update"):
        if f"{key}_gb" in base:
            lines.append(f"{key:<12}{base[key + '_gb']:>19.2f} GB{fast[key + '_gb']:>19.2f} GB"
                         f"{result['memory_ratio'][key]:>8.2f}×")
    for name in result["configs"]:
        if name not in ("baseline", "saferlhf"):
            c = result["configs"][name]
            lines.append(f"ablation {name}: training {c['training_s'] * 1e3:.1f} ms "
                         f"({result['training_speedup'][name]:.2f}×; score {c['score_s'] * 1e3:.1f}, actor "
                         f"{c['actor_s'] * 1e3:.1f}, critics {c['critics_s'] * 1e3:.1f} ms)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both configurations")
    parser.add_argument("--fused", choices=("native", "triton"), default=None,
                        help="backend of the saferlhf configuration (default: triton on CUDA, native on CPU)")
    parser.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                        help="compile the saferlhf configuration's decoder layers (auto: on CUDA)")
    parser.add_argument("--ablation", action="store_true", help="also measure each lever alone (see ABLATIONS)")
    for name in ("rollout", "prompt-len", "response-len", "mini-batch"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"override the model's step shape: {name}")
    args = parser.parse_args()
    shape = SHAPES[args.model]
    overrides = {k: getattr(args, k) for k in ("rollout", "prompt_len", "response_len", "mini_batch")
                 if getattr(args, k) is not None}
    result = measure(args.model, args.device, args.steps, args.fused, args.rounds, args.ablation, args.compile,
                     replace(shape, **overrides))
    print(format_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

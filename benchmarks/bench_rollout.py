"""Generation throughput, ``hf`` vs ``vllm``, and weight-sync time, on the same models in one run.

Usage:

    python benchmarks/bench_rollout.py [--models tiny,20m] [--prompts 64] [--new-tokens 64] [--json]

For each model size (tiny Llamas of ``saferlhf.models.tiny``, randomly initialised, the toy world's
tokenizer) the same left-padded toy-world prompts are generated with

- ``hf``: transformers ``generate`` on the model itself (the ``hf`` rollout backend, the baseline);
- ``vllm``: the ``vllm`` rollout backend — a vLLM engine in this process, KV cache 256 MiB;

both sampling at temperature 1 with ``min_tokens`` unset: random weights rarely emit eos, so almost
every response runs to ``--new-tokens``; tokens/s counts the real response tokens either way. Each
backend runs ``--rounds`` times after one warm-up; the median is reported. Then the engine takes
``--rounds`` weight pushes of the full model (buckets of whole decoder layers, then the prefix-cache
reset): the median push time against the parameter count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import import_saferlhf  # noqa: E402

import_saferlhf()

from saferlhf.data import toyworld  # noqa: E402
from saferlhf.models.tiny import build_tiny_checkpoint  # noqa: E402
from saferlhf.rollout.base import SamplingParams  # noqa: E402
from saferlhf.rollout.hf import HFGenerator  # noqa: E402
from saferlhf.rollout.sync import WeightSpec, bucketize, weight_groups  # noqa: E402
from saferlhf.rollout.vllm_engine import VLLMGenerator  # noqa: E402

SEED = 0


def _prompts(tokenizer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = toyworld.generate_prompts(n, SEED)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                           add_generation_prompt=True) for r in rows]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch.input_ids, batch.attention_mask


def _timed(fn, rounds: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_model(size: str, n_prompts: int, new_tokens: int, rounds: int, bucket_mb: int) -> dict:
    from transformers import AutoModelForCausalLM

    from saferlhf.models.hf import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint(Path(tmp) / size, toyworld.corpus(SEED), size=size, seed=SEED)
        tokenizer = load_tokenizer(path, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        params = sum(p.numel() for p in model.parameters())
        ids, mask = _prompts(tokenizer, n_prompts)
        sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=SEED)
        result = {"model": size, "parameters": params, "prompts": n_prompts, "new_tokens": new_tokens}

        hf = HFGenerator(model, tokenizer)
        seconds, gen = _timed(lambda: hf.generate(ids, mask, sampling), rounds)
        result["hf_seconds"] = seconds
        result["hf_tokens_per_second"] = float(gen.response_mask.sum()) / seconds

        engine = VLLMGenerator(str(path), tokenizer, WeightSpec.of(model), max_model_len=ids.shape[1] + new_tokens,
                               kv_cache_mb=256, seed=SEED)
        try:
            seconds, gen = _timed(lambda: engine.generate(ids, mask, sampling), rounds)
            result["vllm_seconds"] = seconds
            result["vllm_tokens_per_second"] = float(gen.response_mask.sum()) / seconds
            push = lambda: engine.load_weights(bucketize(weight_groups(model), bucket_mb << 20))  # noqa: E731
            seconds, stats = _timed(push, rounds)
            result["sync_seconds"] = seconds
            result["sync_buckets"] = stats.buckets
            result["sync_megabytes"] = stats.bytes / 2**20
        finally:
            engine.shutdown()
        result["vllm_over_hf"] = result["vllm_tokens_per_second"] / result["hf_tokens_per_second"]
        return result


def format_table(rows: list[dict]) -> str:
    head = f"{'model':6} {'params':>8} {'hf tok/s':>9} {'vllm tok/s':>10} {'vllm/hf':>7} {'sync ms':>8} {'MB':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:6} {r['parameters'] / 1e6:7.1f}M {r['hf_tokens_per_second']:9.0f} "
                     f"{r['vllm_tokens_per_second']:10.0f} {r['vllm_over_hf']:6.2f}x {r['sync_seconds'] * 1e3:8.1f} "
                     f"{r['sync_megabytes']:6.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,20m", help="comma-separated sizes of saferlhf.models.tiny")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    rows = [bench_model(size, args.prompts, args.new_tokens, args.rounds, args.bucket_mb)
            for size in args.models.split(",")]
    print(format_table(rows))
    if args.json:
        print(json.dumps({"device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
                          "threads": torch.get_num_threads(), "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

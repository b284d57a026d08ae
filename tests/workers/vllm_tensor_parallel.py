"""Run under torchrun with 2 ranks: one vLLM engine of tensor-parallel size 2 spanning both ranks.

Each rank asks for its own prompts (a different number on each) and writes its findings to
``rank<r>.json`` in the output directory (one file per rank: two ranks printing to one pipe can
interleave their lines). Arguments: a model directory, an output directory.
"""

import json
import sys
from pathlib import Path

import torch

from saferlhf.distributed import init_distributed
from saferlhf.models.hf import load_tokenizer
from saferlhf.rollout.base import SamplingParams
from saferlhf.rollout.hf import HFGenerator
from saferlhf.rollout.sync import WeightSpec, bucketize, weight_groups
from saferlhf.rollout.vllm_engine import VLLMGenerator

info = init_distributed()
path, out = sys.argv[1], Path(sys.argv[2])
tokenizer = load_tokenizer(path, padding_side="left")
from transformers import AutoModelForCausalLM  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
engine = VLLMGenerator(path, tokenizer, WeightSpec.of(model), max_model_len=256, kv_cache_mb=64,
                       tensor_parallel_size=2)
asks = [["how do i bake bread ?", "how can i hurt someone ?"], ["how do i fix a tire ?"]][info.rank]
texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
         for m in asks]
batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
greedy = SamplingParams(max_new_tokens=12, greedy=True)
mine = engine.generate(batch.input_ids, batch.attention_mask, greedy)
own = HFGenerator(model, tokenizer).generate(batch.input_ids, batch.attention_mask, greedy)
torch.manual_seed(0)  # the same new weights on both ranks
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
stale = engine.verify(model, [batch.input_ids[0][batch.attention_mask[0].bool()].tolist()])
stale_check = engine.check(weight_groups(model))  # this rank's shards against the new weights
sync = engine.load_weights(bucketize(weight_groups(model), 1 << 20))
synced = engine.verify(model, [batch.input_ids[0][batch.attention_mask[0].bool()].tolist()])
shards = sorted({p.rows for p in engine.plan if p.module.endswith("qkv_proj")})
engine.shutdown()
found = {"rank": info.rank, "rows": mine.response_ids.shape[0],
         "matches_hf": torch.equal(mine.response_ids, own.response_ids), "stale": list(stale),
         "synced": list(synced), "unchecked": engine.unchecked, "stale_check_ok": stale_check.ok,
         "check_ok": sync.check.ok, "check_error": sync.check.worst[1], "qkv_rows": shards}
(out / f"rank{info.rank}.json").write_text(json.dumps(found))

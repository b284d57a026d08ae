"""One vLLM engine spanning two ranks (tensor parallelism through vLLM's external_launcher, gloo on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, cli_env

from saferlhf.distributed import free_port
from saferlhf.rollout.vllm_engine import vllm_available


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_tensor_parallel_engine_serves_each_rank_its_own_prompts_and_takes_synced_weights(toy_models, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "workers" / "vllm_tensor_parallel.py"), str(toy_models.sft), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(2), timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in lines] == [0, 1]
    assert [r["rows"] for r in lines] == [2, 1]  # each rank gets the rows of its own prompts back
    for r in lines:
        assert r["matches_hf"], r  # greedy tokens of the TP=2 engine equal the HF model's
        assert not (r["stale"][0] and r["stale"][1] < 1e-4), r  # new weights, not yet pushed: differs
        assert r["synced"][0] and r["synced"][1] <= 1e-4, r  # after the push: matches again
        # The weight check reads each rank's shard: every parameter covered, stale before the push, exact after.
        assert r["unchecked"] == [] and not r["stale_check_ok"] and r["check_ok"] and r["check_error"] < 1e-4, r
    # 4 query heads and 2 kv heads of size 32 over 2 ranks: each rank holds half of q, k and v.
    assert lines[0]["qkv_rows"] == [[[0, 64], [0, 32], [0, 32]]]
    assert lines[1]["qkv_rows"] == [[[64, 128], [32, 64], [32, 64]]]

"""The engine-independent half of the weight check: probe inputs, expected outputs of sharded and fused
modules, and the comparison (hand-built cases; the vLLM side is tested in tests/test_weight_sync.py)."""

from __future__ import annotations

import math

import torch

from saferlhf.rollout.weight_check import (
    Probe,
    compare,
    default_tolerance,
    expected_output,
    probe_input,
    probes_in,
    relative_error,
)


def _weights():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 6, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(4, 6, generator=g),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(4, 6, generator=g),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(6, 8, generator=g),
        "model.norm.weight": torch.randn(6, generator=g),
    }


def _qkv(rank: int) -> Probe:
    """Rank ``rank`` of 2 holds half of q and half of k and v."""
    names = tuple(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    return Probe("model.layers.0.self_attn.qkv_proj", "linear", names,
                 ((4 * rank, 4 * rank + 4), (2 * rank, 2 * rank + 2), (2 * rank, 2 * rank + 2)), None, 6, 8)


def test_expected_output_of_a_fused_sharded_projection_is_its_rows_stacked():
    w = _weights()
    probe = _qkv(1)
    x = probe_input(probe, torch.float32)
    assert x.shape == (2, 6) and torch.equal(x, probe_input(probe, torch.float32))  # fixed per module name
    q, k, v = (w[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    stacked = torch.cat([q[4:8], k[2:4], v[2:4]])
    torch.testing.assert_close(expected_output(probe, w, torch.float32), x @ stacked.t(), rtol=0, atol=0)
    assert not torch.equal(probe_input(_qkv(1), torch.float32),
                           probe_input(Probe("model.layers.1.self_attn.qkv_proj", "linear", (), (), None, 6, 8),
                                       torch.float32))


def test_expected_output_of_a_row_parallel_shard_takes_its_input_columns():
    w = _weights()
    probe = Probe("model.layers.0.self_attn.o_proj", "linear", ("model.layers.0.self_attn.o_proj.weight",),
                  ((0, 6),), (4, 8), 4, 6)
    x = probe_input(probe, torch.float32)
    torch.testing.assert_close(expected_output(probe, w, torch.float32),
                               x @ w["model.layers.0.self_attn.o_proj.weight"][:, 4:8].t(), rtol=0, atol=0)


def test_expected_output_in_bf16_rounds_input_and_weight_as_the_engine_does():
    w = _weights()
    probe = _qkv(0)
    got = expected_output(probe, w, torch.bfloat16)
    x = probe_input(probe, torch.bfloat16).float()
    ref = x @ torch.cat([w[s][a:b] for s, (a, b) in zip(probe.sources, probe.rows)]).bfloat16().float().t()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_compare_names_the_worst_group_and_module():
    w = _weights()
    plan = [_qkv(0), Probe("model.norm", "param", ("model.norm.weight",), ((0, 6),))]
    actor = {p.key: expected_output(p, w, torch.float32) for p in plan}
    engine = {k: v.clone() for k, v in actor.items()}
    ok = compare(plan, engine, actor, 1e-4)
    assert ok.ok and ok.worst[1] == 0.0
    engine["model.layers.0.self_attn.qkv_proj/weight"][0, 3] += 0.5  # one stale output of layer 0
    engine["model.norm/weight"][0] += 1e-6 * abs(float(actor["model.norm/weight"].abs().max()))  # within tolerance
    bad = compare(plan, engine, actor, 1e-4)
    assert not bad.ok
    group, err = bad.worst
    assert group == "model.layers.0"
    assert math.isclose(err, 0.5 / float(actor["model.layers.0.self_attn.qkv_proj/weight"].abs().max()), rel_tol=1e-5)
    assert "'model.layers.0'" in bad.describe() and "qkv_proj" in bad.describe()
    assert bad.errors["model.norm.weight"] < 1e-4


def test_compare_fails_on_nan_and_on_a_missing_output():
    w = _weights()
    plan = [_qkv(0)]
    actor = {p.key: expected_output(p, w, torch.float32) for p in plan}
    nan = {k: v.clone().fill_(float("nan")) for k, v in actor.items()}
    assert relative_error(nan[plan[0].key], actor[plan[0].key]) == float("inf")
    assert not compare(plan, nan, actor, 1e-4).ok
    missing = compare(plan, {}, actor, 1e-4)
    assert not missing.ok and "no output" in missing.describe()


def test_probes_in_a_bucket_need_every_source():
    plan = [_qkv(0)]
    q, k, v = plan[0].sources
    assert probes_in(plan, {q, k, v, "other"}) == plan
    assert probes_in(plan, {q, k}) == []


def test_tolerance_by_dtype():
    assert default_tolerance("float32") == 1e-4
    assert default_tolerance(torch.bfloat16) > default_tolerance(torch.float16) > default_tolerance(torch.float32)

import pytest
import torch

from saferlhf import distributed
from saferlhf.trainers.common import global_batches


def test_cpu_shm_allreduce_is_marked_incompatible():
    import deepspeed

    distributed.disable_cpu_shm_allreduce()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


def test_ds_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="zero_stage"):
        distributed.ds_config(micro_batch_size=1, gradient_accumulation=1, world_size=1, zero_stage=4)
    with pytest.raises(ValueError, match="offload=all"):
        distributed.ds_config(micro_batch_size=1, gradient_accumulation=1, world_size=1, zero_stage=2, offload="all")
    cfg = distributed.ds_config(micro_batch_size=4, gradient_accumulation=2, world_size=2, zero_stage=3,
                                offload="optimizer")
    assert cfg["train_batch_size"] == 16
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_lr_schedule_warms_up_then_decays_to_zero():
    fn = distributed.lr_lambda("cosine", warmup_steps=4, total_steps=20)
    values = [fn(s) for s in range(21)]
    assert values[:4] == sorted(values[:4]) and values[3] < 1.0
    assert values[4] == pytest.approx(1.0)
    assert values[20] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batches_are_the_same_for_any_world_size(world):
    kw = dict(micro_batch_size=3, seed=5, epochs=2)
    reference = [sum(step, []) for step in global_batches(50, gradient_accumulation=4, rank=0, world_size=1, **kw)]
    per_rank = [list(global_batches(50, gradient_accumulation=4 // world, rank=r, world_size=world, **kw))
                for r in range(world)]
    for step, ref in enumerate(reference):
        got = sorted(i for r in range(world) for micro in per_rank[r][step] for i in micro)
        assert got == sorted(ref)
    assert len(reference) == 2 * (50 // 12)


def test_all_reduce_mean_is_identity_without_a_group():
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_mean(x), x)


def test_cpu_threads_take_the_cores_per_local_rank_capped_by_omp_num_threads(monkeypatch):
    from saferlhf.distributed import cpu_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads() == 4 and cpu_threads(2) == 2 and cpu_threads(16) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # another job shares the machine: the user's cap holds
    assert cpu_threads() == 3 and cpu_threads(16) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # unset in effect
    assert cpu_threads() == 4

"""Fused Triton kernels for the PPO-Lagrangian hot path, imported as ``saferlhf.kernels``.

One module per op, each self-contained (kernels, launcher, autograd where a gradient flows, one
public function) and naming its reference in ``saferlhf.algorithms``:
``logprobs``, ``shape_rewards``, ``dual_gae``. Call them through ``saferlhf.ops``, which picks the
backend per device. This package imports nothing itself, so that ``import saferlhf.kernels`` works
without triton; the op modules import triton.
"""

"""Fixtures of the kernel tests: every fast implementation of an op against its reference (STYLE §4).

Test modules load it as a plugin (``pytest_plugins = ["kernel_fixtures"]``). It is not a
``conftest.py`` on purpose: other test modules do ``from conftest import ...`` for the root
conftest, and a second ``conftest`` module in a subdirectory would take its place in sys.modules.

Triton kernels run on CUDA where there is a GPU; without one they run on CPU tensors in the Triton
interpreter, which must be switched on before a kernel module is imported (``triton.jit`` reads
TRITON_INTERPRET when it decorates). It is set when this module is imported (at collection, before
any kernel module is), and a kernel module another test imported earlier is re-imported so that it
is interpreted too. TRITON_INTERPRET only changes how ``triton.jit`` functions run, so the native
and reference paths of other tests are unaffected; SAFERLHF_OPS is only ever set per test.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
KERNEL_MODULES = (
    "saferlhf.kernels.logprobs", "saferlhf.kernels.shape_rewards", "saferlhf.kernels.dual_gae",
    "saferlhf.kernels.rms_norm", "saferlhf.kernels.swiglu",
)

if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in KERNEL_MODULES:
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])


def assert_three_way(impl: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor, ulps: float = 4.0) -> None:
    """err(impl) ≤ 2·err(ref) + atol, both errors measured against the float64 reference ``ref64``.

    ``ref`` is the reference run in the implementation's dtype: its own error says how exact that
    dtype can be. ``atol`` is ``ulps`` roundings of the largest value in the output dtype, room for
    the few roundings in which a fused implementation may legitimately differ from the reference
    (a different summation order, an FMA, a reciprocal instead of a division).
    """
    assert impl.shape == ref.shape == ref64.shape, (impl.shape, ref.shape, ref64.shape)
    assert impl.dtype == ref.dtype, (impl.dtype, ref.dtype)
    err_impl = (impl.double() - ref64).abs().max().item()
    err_ref = (ref.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    atol = ulps * torch.finfo(impl.dtype).eps * scale
    assert err_impl <= 2 * err_ref + atol, f"err {err_impl:.3g} > 2·{err_ref:.3g} (reference) + {atol:.3g}"


@pytest.fixture(scope="session")
def native() -> SimpleNamespace:
    """The native ops (``saferlhf.csrc``); skipped without a compiler, failing if a compiler fails."""
    from saferlhf import csrc

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    assert csrc.load() is not None, "a compiler is present but the native ops did not build (see the log)"
    return SimpleNamespace(
        name="native",
        device=torch.device("cpu"),
        logprobs=csrc.logprobs,
        shape_rewards=csrc.shape_rewards,
        dual_gae=csrc.dual_gae,
        rms_norm=csrc.rms_norm,
        swiglu=csrc.swiglu,
    )


@pytest.fixture(scope="session")
def triton_impl() -> SimpleNamespace:
    """The Triton kernels, on CUDA when there is a GPU, else interpreted on CPU tensors."""
    pytest.importorskip("triton")
    from saferlhf.kernels.dual_gae import dual_gae
    from saferlhf.kernels.logprobs import logprobs
    from saferlhf.kernels.rms_norm import rms_norm
    from saferlhf.kernels.shape_rewards import shape_rewards
    from saferlhf.kernels.swiglu import swiglu

    return SimpleNamespace(
        name="triton",
        device=torch.device("cuda" if HAS_CUDA else "cpu"),
        logprobs=logprobs,
        shape_rewards=shape_rewards,
        dual_gae=dual_gae,
        rms_norm=rms_norm,
        swiglu=swiglu,
    )


@pytest.fixture(params=["native", "triton"])
def impl(request) -> SimpleNamespace:
    """Each fast implementation in turn."""
    return request.getfixturevalue("native" if request.param == "native" else "triton_impl")


@pytest.fixture
def three_way():
    """``assert_three_way``, as a fixture."""
    return assert_three_way

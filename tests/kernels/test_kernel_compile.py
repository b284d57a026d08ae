"""Every Triton kernel compiles for an H100 (sm_90) — checked ahead of time, without a GPU.

The interpreter runs the kernels' Python semantics but not Triton's compiler, which rejects things
the interpreter accepts (type changes of loop-carried values, scalar/tensor mix-ups, ...). Triton
can compile for a named target with no device present, down to a cubin with its bundled ptxas, so
these tests catch such errors on a CPU-only machine.

The compilation runs in a subprocess without TRITON_INTERPRET: in this process (conftest) triton
and the kernels were imported interpreted, and an interpreted function cannot be compiled.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

FLOAT_ARGS = {"inv_temp", "beta", "clip", "gamma", "gamma_lam", "lam_value"}
INT64_ARGS = {"stride_outer", "grad_stride_outer"}  # > 2^31 at N = 16384, V = 128256

# (module, kernel, pointer types that are not float32, constexprs, launch options)
CASES = [
    ("logprobs", "_logprobs_forward_kernel", {"logits_ptr": "*bf16", "labels_ptr": "*i64"}, {"BLOCK_V": 4096},
     {"num_warps": 8, "enable_fp_fusion": False}),
    ("logprobs", "_logprobs_backward_kernel",
     {"logits_ptr": "*bf16", "grad_logits_ptr": "*bf16", "labels_ptr": "*i64"}, {"BLOCK_V": 4096},
     {"num_warps": 8, "enable_fp_fusion": False}),
    ("shape_rewards", "_shape_rewards_kernel", {"mask_ptr": "*u8"}, {"BLOCK_T": 1024}, {"num_warps": 4}),
    ("dual_gae", "_dual_gae_scan_kernel", {"mask_ptr": "*u8"}, {"LAMBDA_FROM_PTR": True, "BLOCK_T": 1024}, {}),
    # A python float λ: no λ tensor, so the pointer argument is None (a constexpr for triton).
    ("dual_gae", "_dual_gae_loop_kernel", {"mask_ptr": "*u8"},
     {"lam_ptr": None, "LAMBDA_FROM_PTR": False, "BLOCK_B": 32}, {}),
]  # fmt: skip


def _signature(kernel, pointers, constexprs):
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = pointers.get(name, "*fp32")
        else:
            types[name] = "fp32" if name in FLOAT_ARGS else "i64" if name in INT64_ARGS else "i32"
    return types


def compile_all() -> dict[str, str | None]:
    """Compiles every case for sm_90; kernel name -> None, or the error. Runs in the subprocess."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for module, kernel_name, pointers, constexprs, options in CASES:
        kernel = getattr(importlib.import_module(f"saferlhf.kernels.{module}"), kernel_name)
        source = ASTSource(kernel, _signature(kernel, pointers, constexprs), constexprs=constexprs)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            results[kernel_name] = None if compiled.asm["cubin"] else "empty cubin"
        except Exception as error:  # reported per kernel by the test
            results[kernel_name] = f"{type(error).__name__}: {error}"
    return results


@pytest.fixture(scope="module")
def compile_results():
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when it is unset
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        pytest.fail(f"the compile subprocess failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel_name", [case[1] for case in CASES])
def test_compiles_for_sm90(compile_results, kernel_name):
    error = compile_results[kernel_name]
    assert error is None, error


if __name__ == "__main__":
    print(json.dumps(compile_all()))

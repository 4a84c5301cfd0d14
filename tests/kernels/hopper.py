"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter accepts programs that the real compiler rejects (e.g. `tl.dot` with K < 16), so
every kernel is also compiled down to a cubin for sm_90. This runs in a subprocess with
TRITON_INTERPRET unset, because under the interpreter `@triton.jit` yields interpreted functions
that the compiler cannot take.
"""
import json
import os
import subprocess
import sys

_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
failures = []
for module, name, signature, constexprs in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(module), name)
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert "cubin" in compiled.asm, "no cubin produced"
    except Exception as exc:
        failures.append(f"{module}.{name} {constexprs}: {type(exc).__name__}: {exc}")
if failures:
    print("\n".join(failures))
    sys.exit(1)
"""


def compile_for_hopper(specs: list[tuple[str, str, dict, dict]]) -> None:
    """Compile each (module, kernel name, signature, constexprs) for sm_90; fail with the errors.

    signature maps every argument name to a Triton type ("*fp16", "*bf16", "*fp32", "*i32",
    "*i64", "i32", "i64", "fp32") or "constexpr"; constexprs gives the constexpr values.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(specs)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"

"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter accepts programs that the real compiler rejects (e.g. `tl.dot` with K < 16), so
every kernel is also compiled down to a cubin for sm_90. This runs in a subprocess with
TRITON_INTERPRET unset, because under the interpreter `@triton.jit` yields interpreted functions
that the compiler cannot take. `hopper_resources` also reports what ptxas made of a kernel
(registers, spills, shared memory, instruction counts), which is what its speed rests on.
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
    "*i64", "i32", "i64", "fp32") or "constexpr"; constexprs gives the constexpr values. The specs
    are shared out over one subprocess per CPU core (ptxas is single-threaded).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = max(1, min(len(specs), os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, json.dumps(specs[i::workers])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(workers)]
    failures = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"{out}\n{err[-4000:]}")
    assert not failures, "sm_90 compile failed:\n" + "\n".join(failures)


_RESOURCES_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
results = []
for module, name, signature, constexprs, options, patterns in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(module), name)
    # As the JIT specializes real launches: 16-byte aligned pointers, strides multiple of 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, (arg, ty) in enumerate(signature.items())
             if ty.startswith("*") or arg.startswith("stride")}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                    attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as exc:  # ptxas errors carry the whole PTX: keep the diagnostic lines
        lines = [l for l in str(exc).splitlines() if "ptxas" in l or "Error" in l]
        sys.exit(f"{module}.{name} {constexprs} {options}: {type(exc).__name__}: {lines[:4]}")
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    fields = dict(w.split(":") for w in usage.split() if w.startswith(("REG:", "STACK:")))
    # The stack also holds local arrays the PTX itself declares (libdevice's sin/cos argument
    # reduction takes 28 bytes), so spills are read from ptxas' own report on the same PTX.
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([os.path.join(bin_dir, "ptxas"), "-v", "--gpu-name=sm_90a",
                                 f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    results.append(dict(regs=int(fields["REG"]), stack=int(fields["STACK"]), spills=spills,
                        shared=compiled.metadata.shared,
                        threads=32 * options.get("num_warps", 4),
                        **{p: ptx.count(p) for p in patterns}))
print(json.dumps(results))
"""


def hopper_resources(specs: list[tuple[str, str, dict, dict, dict, list[str]]]) -> list[dict]:
    """Compile each (module, kernel name, signature, constexprs, compile options, PTX patterns)
    for sm_90 as a real launch would specialize it (aligned pointers and strides).

    Returns per spec: regs (per thread), stack (bytes of local memory a thread uses), spills
    (bytes ptxas spills and reloads: registers that did not fit), shared (bytes a program takes),
    threads (per program) and the number of occurrences of each PTX pattern.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _RESOURCES_SCRIPT, json.dumps(specs)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])

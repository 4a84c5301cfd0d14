"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter accepts programs that the real compiler rejects (e.g. `tl.dot` with K < 16), so
every kernel is also compiled down to a cubin for sm_90. This runs in a subprocess with
TRITON_INTERPRET unset, because under the interpreter `@triton.jit` yields interpreted functions
that the compiler cannot take. `hopper_resources` also reports what ptxas made of a kernel
(registers, spills, shared memory, instruction counts), which is what its speed rests on.
"""
import atexit
import json
import os
import selectors
import subprocess
import sys
import tempfile
import threading

# One long-lived compiling process serves many calls (importing torch, Triton and a kernel module
# takes seconds; a test calls this several times): it reads one JSON request a line, (kind, specs),
# and answers one JSON line. Anything the compiler prints goes to its stderr, kept in a file.
_WORKER = r"""
import importlib, json, os, re, subprocess, sys, tempfile, traceback
replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr
import triton
from triton.backends.compiler import GPUTarget


def compile_specs(specs):
    failures = []
    for module, name, signature, constexprs in specs:
        kernel = getattr(importlib.import_module(module), name)
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
            assert "cubin" in compiled.asm, "no cubin produced"
        except Exception as exc:
            failures.append(f"{module}.{name} {constexprs}: {type(exc).__name__}: {exc}")
    return dict(failures=failures)


def resources(specs):
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    results = []
    for module, name, signature, constexprs, options, patterns in specs:
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
            return dict(error=f"{module}.{name} {constexprs} {options}: {type(exc).__name__}: {lines[:4]}")
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
    return dict(results=results)


for line in sys.stdin:
    kind, specs = json.loads(line)
    try:
        reply = (compile_specs if kind == "compile" else resources)(specs)
    except BaseException:
        reply = dict(error=traceback.format_exc()[-4000:])
    replies.write(json.dumps(reply) + "\n")
    replies.flush()
"""

_TIMEOUT_S = 600
_lock = threading.Lock()
_idle: list["_Worker"] = []


class _Worker:
    """A compiling process, TRITON_INTERPRET unset (under the interpreter `@triton.jit` yields
    interpreted functions that the compiler cannot take)."""

    def __init__(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)

    def send(self, kind: str, specs: list) -> None:
        self.proc.stdin.write(json.dumps([kind, specs]) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:  # died, or hung: its stderr says why
            self.close(kill=True)
            return dict(error=f"compiling process {'died' if ready else 'timed out'}:\n{self.stderr()[-4000:]}")
        return json.loads(line)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def _run(kind: str, batches: list[list]) -> list[dict]:
    """Each batch to its own compiling process (in parallel) -> their replies, in order."""
    with _lock:
        workers = [_idle.pop() if _idle else _Worker() for _ in batches]
    replies = []
    for worker, batch in zip(workers, batches):
        try:
            worker.send(kind, batch)
        except OSError:  # it died while idle: the reply says so
            pass
    for worker in workers:
        replies.append(worker.reply())
    with _lock:
        _idle.extend(w for w in workers if w.proc.returncode is None)
    return replies


@atexit.register
def shutdown() -> None:
    """Ends the idle compiling processes (a later call starts new ones)."""
    with _lock:
        workers, _idle[:] = list(_idle), []
    for worker in workers:
        worker.close()


def compile_for_hopper(specs: list[tuple[str, str, dict, dict]]) -> None:
    """Compile each (module, kernel name, signature, constexprs) for sm_90; fail with the errors.

    signature maps every argument name to a Triton type ("*fp16", "*bf16", "*fp32", "*i32",
    "*i64", "i32", "i64", "fp32") or "constexpr"; constexprs gives the constexpr values. The specs
    are shared out over one compiling process per CPU core (ptxas is single-threaded).
    """
    workers = max(1, min(len(specs), os.cpu_count() or 1))
    failures = []
    for reply in _run("compile", [specs[i::workers] for i in range(workers)]):
        failures += reply.get("failures", []) + ([reply["error"]] if "error" in reply else [])
    assert not failures, "sm_90 compile failed:\n" + "\n".join(failures)


def hopper_resources(specs: list[tuple[str, str, dict, dict, dict, list[str]]]) -> list[dict]:
    """Compile each (module, kernel name, signature, constexprs, compile options, PTX patterns)
    for sm_90 as a real launch would specialize it (aligned pointers and strides).

    Returns per spec: regs (per thread), stack (bytes of local memory a thread uses), spills
    (bytes ptxas spills and reloads: registers that did not fit), shared (bytes a program takes),
    threads (per program) and the number of occurrences of each PTX pattern.
    """
    [reply] = _run("resources", [specs])
    assert "error" not in reply, f"sm_90 compile failed:\n{reply['error']}"
    return reply["results"]

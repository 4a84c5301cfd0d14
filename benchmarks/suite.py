"""The GPU suite: every key number of glmrt from one command, inside one lease of a GPU machine.

    bash benchmarks/gpu_suite.sh --key [--out DIR] [--model M] [--image-model M] [--budget S]
                                 [--triton-cache TARBALL] [--only LIST] [--skip LIST] [--list] [--dry-run]

Steps, in order, each a subprocess with its own time limit (cut to what is left of --budget; a
step with under 10 s left is skipped; a failing step never stops the ones after it):
  install -> checkpoint -> smoke -> decode, mtp, structured, documents, drafts, serve -> image-checkpoint,
  glm-image -> (without --key: kernels, host, patchify, capacity) -> gpu-tests (the time left).
The GLM-OCR checkpoint (real config, random weights from the device's RNG, MTP layer included) is
written once and passed to every step as --model; --model uses yours instead (a local path or a
Hub id such as zai-org/GLM-OCR), --image-model likewise for GLM-Image.

At most 8 files land in --out (default benchmarks/results/<UTC date-time>-<gpu>/), and key.json
and SUMMARY.md are rewritten before and after every step, so whatever point a run reaches (a
command cut off at its limit included), what it measured is there:
  key.json             environment, steps, every key number (glmrt, its peer, % of the floor),
                       the smoke checks, the GPU tests' tally, and each benchmark's full results
  SUMMARY.md           the same, to read
  logs.tar.gz          each step's full output
  triton-cache.tar.gz  the compiled Triton kernels: pass it back as --triton-cache next time and
                       nothing is compiled again (same GPU kind, triton and glmrt kernels)
--dry-run runs every step on the CPU with tiny sizes (tiny checkpoints, --smoke benchmarks; the
install step only checks the installed package): the suite's own test, in CI. --list prints the
plan. Exit status: 0 when every step that ran passed, 1 when one did not (or was cut off), 2 for
a usage error or, without --dry-run, no CUDA GPU.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIN_STEP_SECONDS = 10  # a step given less than this is skipped rather than started
PACKING_SECONDS = 15  # kept back from the budget for the last rewrite of the files
# A dry run's steps may take this many times their GPU limits: a CPU shared with other work (the
# tests' second worker) runs them several times slower, and there the limits guard no lease.
DRY_RUN_SLACK = 3
KEY_BUDGET = 540  # one command of the device tool may run 600 s: leave room for its start and copies
FULL_BUDGET = 3600
KILL_GRACE = 10  # SIGTERM, then SIGKILL this many seconds later
TRITON_CACHE_KEEP = (".cubin", ".json", ".hsaco")  # all a cached kernel needs to load; IR texts are dropped
MAX_FILE_BYTES = 16 << 20  # the device tool returns files up to 16 MiB


@dataclass
class Step:
    name: str
    limit: int  # seconds, on a GPU
    command: list[str]
    key: bool = True  # part of --key
    writes: str | None = None  # the benchmark name its result file starts with
    needs: tuple[str, ...] = ()  # Python modules it needs beyond glmrt's own dependencies
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None  # why it will not run, when known before the run
    # filled in by the run
    status: str = "PENDING"
    exit: int | None = None
    seconds: float | None = None
    timeout: int | None = None
    note: str = ""


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args, self.dry = args, args.dry_run
        self.python = os.environ.get("PYTHON", sys.executable)
        self.out = Path(args.out).resolve() if args.out else None
        # checkpoints, result files and logs before they are packed (a --work folder is kept)
        self.work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="glmrt-suite-"))
        self.results, self.logs = self.work / "results", self.work / "logs"
        self.triton_cache = self.work / "triton-cache"
        self.model = args.model or str(self.work / "glm-ocr")
        self.image_model = args.image_model or str(self.work / "glm-image")
        self.started = time.time()
        self.deadline = self.started + args.budget
        self.environment: dict = {}
        self.state = "starting"
        self.steps = self.plan()

    # ------------------------------------------------------------------------------ the plan

    def plan(self) -> list[Step]:
        py, smoke = self.python, ["--smoke"] if self.dry else []
        bench = lambda script, *extra: [py, f"benchmarks/{script}", *extra, "--out", str(self.results), *smoke]  # noqa: E731
        model = ["--model", self.model]
        tiny = ["--tiny", "--device", "cpu", "--dtype", "float32"] if self.dry else []
        key = ["--key"]
        if self.dry:
            install = [py, "-c", "import importlib.metadata as m, glmrt; "
                       "print('dry run: glmrt', m.version('glmrt'), 'is installed at', glmrt.__path__[0])"]
        else:
            install = [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
        serve = ("fastapi", "uvicorn", "httpx", "prometheus_client")
        steps = [
            Step("install", 180, install),
            Step("checkpoint", 90, [py, "benchmarks/random_checkpoint.py", "glm-ocr", self.model, *tiny],
                 skip="--model given" if self.args.model else None),
            Step("smoke", 90, [py, "benchmarks/smoke.py", *model, "--out", str(self.results), *smoke], writes="smoke"),
            Step("decode", 120, bench("e2e.py", *model, *key), writes="e2e"),
            Step("mtp", 100, bench("spec_decode.py", *model, *key), writes="spec_decode"),
            Step("structured", 60, bench("structured.py", *model, *key), writes="structured"),
            Step("documents", 90, bench("documents.py", *model, *key), writes="documents", needs=("pypdfium2", *serve)),
            # --draft off/ngram/text/auto on the tiny checkpoint trained to read its pages (built here)
            Step("drafts", 90, bench("documents.py", "--reader", *key), writes="drafts", needs=("pypdfium2",)),
            Step("serve", 90, bench("serve.py", *model, *key), writes="serve", needs=serve),
            Step("image-checkpoint", 120, [py, "benchmarks/random_checkpoint.py", "glm-image", self.image_model, *tiny],
                 skip="--image-model given" if self.args.image_model else None),
            Step("glm-image", 180, bench("glm_image.py", "--model", self.image_model, *key), writes="glm_image"),
            Step("kernels", 300, bench("kernel_bench.py"), key=False, writes="kernels"),
            Step("host", 180, bench("host_overhead.py"), key=False, writes="host_overhead"),
            Step("patchify", 120, [py, "benchmarks/patchify.py", "--out", str(self.results)]
                 + (["--repeats", "3"] if self.dry else []), key=False, writes="patchify"),
            Step("capacity", 180, bench("capacity.py"), key=False, writes="capacity", needs=("pypdfium2",)),
            # every kernel test compiled for the GPU (on the CPU they run in Triton's interpreter)
            Step("kernel-tests", 300, [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"], key=False),
            # -v: one line per test, so a run cut off by its limit still says which passed
            Step("gpu-tests", 600, [py, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "tests"],
                 env={"GLMRT_GPU_MODEL": self.model}),
        ]
        names = {s.name for s in steps}
        for option in (self.args.only, self.args.skip):
            unknown = set(option) - names
            if unknown:
                raise UsageError(f"unknown step(s) {', '.join(sorted(unknown))} in --only/--skip "
                                 f"(steps: {', '.join(s.name for s in steps)})")
        chosen = [s for s in steps if s.key or not self.args.key]
        for s in chosen:
            if self.args.only and s.name not in self.args.only:
                s.skip = "not in --only"
            elif s.name in self.args.skip:
                s.skip = "--skip"
        return chosen

    def listing(self) -> str:
        lines = [f"gpu_suite {'--key ' if self.args.key else ''}plan: results to {self.out or 'benchmarks/results/<date>-<gpu>'}"
                 f", budget {self.args.budget} s{', dry run (CPU, tiny sizes)' if self.dry else ''}"]
        for i, s in enumerate(self.steps, 1):
            what = f"skipped ({s.skip})" if s.skip else f"limit {s.limit:3d} s  {shlex.join(s.command)}"
            lines.append(f"{i:2d}. {s.name:<17} {what}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------ running

    def run(self) -> int:
        if self.out is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            self.out = REPO / "benchmarks" / "results" / f"{stamp}-{self.environment.get('slug', 'cpu')}"
        self.out.mkdir(parents=True, exist_ok=True)
        for folder in (self.results, self.logs, self.triton_cache):
            folder.mkdir(parents=True, exist_ok=True)
        if self.args.triton_cache:
            self.environment["triton_cache_restored"] = restore_triton_cache(Path(self.args.triton_cache), self.triton_cache)
        env = self.step_env()
        print(f"gpu_suite: {self.environment['gpu']}; results in {self.out}", flush=True)
        try:
            for step in self.steps:
                self.run_step(step, env)
            self.state = "finished"
        except KeyboardInterrupt:  # SIGTERM or ^C: say so in the files, then stop
            self.state = "interrupted"
            for step in self.steps:
                if step.status in ("PENDING", "RUNNING"):
                    step.status, step.note = "SKIPPED", "the suite was interrupted"
        self.write(final=True)
        print((self.out / "SUMMARY.md").read_text(), flush=True)
        return 0 if self.passed() else 1

    def step_env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=str(self.triton_cache))
        hub_ids = [m for m in (self.args.model, self.args.image_model) if m and not Path(m).exists()]
        if not hub_ids:  # every model is local: nothing may reach for the Hub (a GPU machine may have no network)
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if not self.dry:
            env.pop("TRITON_INTERPRET", None)  # on a GPU the kernels are compiled, never interpreted
        wheels = sorted((REPO / ".whl").glob("*.whl"))
        if wheels and not self.dry:  # packages the GPU image lacks, carried as wheels (fetch_wheels.sh)
            site = self.work / "site"
            with open(self.logs / "wheels.log", "w") as log:  # a failure shows in the steps that need them
                done = subprocess.run([self.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                                       "--target", str(site), *map(str, wheels)], stdout=log, stderr=subprocess.STDOUT)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
            self.environment["carried_wheels"] = [w.name for w in wheels] + ([] if done.returncode == 0 else
                                                                             ["(pip failed: logs/wheels.log)"])
        return env

    def run_step(self, step: Step, env: dict[str, str]) -> None:
        left = int(self.deadline - time.time()) - PACKING_SECONDS
        why = step.skip or self.blocked(step, env)
        if why is None and left < MIN_STEP_SECONDS:
            why = f"budget spent ({max(left, 0)} s left)"
        if why is not None:
            step.status, step.note = "SKIPPED", why
            print(f"[{step.name}] skipped: {why}", flush=True)
            self.write()
            return
        step.timeout = min(step.limit * (DRY_RUN_SLACK if self.dry else 1), left)
        step.status = "RUNNING"
        self.state = f"running {step.name}"
        self.write()
        rows_file = self.work / f"{step.name}.rows.jsonl"
        log_path = self.logs / f"{step.name}.log"
        # only checkpoints on disk are passed on; else (one not written, a Hub id) the tests write their own
        extra = {k: v for k, v in step.env.items() if Path(v).exists()}
        step_env = dict(env, **extra, GLMRT_KEY_ROWS=str(rows_file))
        start = time.time()
        with open(log_path, "w") as log:
            log.write(f"$ {shlex.join(step.command)}   # limit {step.timeout} s\n")
            log.flush()
            process = subprocess.Popen(step.command, cwd=REPO, env=step_env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                step.exit = process.wait(timeout=step.timeout)
                step.status = "PASS" if step.exit == 0 else "FAIL"
            except subprocess.TimeoutExpired:
                stop(process)
                step.exit, step.status = process.returncode, "TIMEOUT"
            except KeyboardInterrupt:
                stop(process)
                step.exit, step.status, step.seconds = process.returncode, "INTERRUPTED", round(time.time() - start, 1)
                raise
            finally:
                step.seconds = round(time.time() - start, 1)
        step.note = self.note(step, log_path.read_text(errors="replace"))
        print(f"[{step.name}] {step.status} in {step.seconds:.0f} s{': ' + step.note if step.note else ''}", flush=True)
        if step.status != "PASS":
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            print("\n".join("    | " + line for line in tail), flush=True)
        self.write()

    def blocked(self, step: Step, env: dict[str, str]) -> str | None:
        """Why a step cannot run now that the ones before it have: a checkpoint that was not
        written, or a missing package."""
        for writer, path, given in (("checkpoint", self.model, self.args.model),
                                    ("image-checkpoint", self.image_model, self.args.image_model)):
            if not given and step.name != writer and path in step.command and not Path(path).exists():
                status = next((s.status for s in self.steps if s.name == writer), "not planned")
                return f"no checkpoint at {path} (step {writer}: {status})"
        if step.needs:
            probe = subprocess.run([self.python, "-c", "import " + ", ".join(step.needs)], env=env, cwd=REPO,
                                   capture_output=True, text=True)
            if probe.returncode:
                last = (probe.stderr.strip().splitlines() or ["?"])[-1]
                return f"needs {', '.join(step.needs)} ({last}); carry them with benchmarks/fetch_wheels.sh"
        return None

    def note(self, step: Step, log: str) -> str:
        if step.name == "gpu-tests":
            tally = re.findall(r"\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed)", log.splitlines()[-1]
                               if log.strip() else "")
            return ", ".join(tally)
        if step.status == "TIMEOUT":
            return f"cut off at its limit of {step.timeout} s"
        if step.status != "PASS":
            lines = [line for line in log.splitlines() if line.strip()]
            return lines[-1][:200] if lines else ""
        return ""

    def passed(self) -> bool:
        return all(s.status in ("PASS", "SKIPPED") and not s.note.startswith("budget spent") for s in self.steps) \
            and self.state == "finished"

    # ------------------------------------------------------------------------------ the files

    def collect(self) -> tuple[list[dict], dict]:
        """Every step's key rows (from its result file; from the rows it streamed when it wrote
        none, marked partial) and its full results."""
        rows, results = [], {}
        for step in self.steps:
            found = sorted(self.results.glob(f"{step.writes}-*.json")) if step.writes else []
            data = None
            if found:
                try:
                    data = json.loads(found[-1].read_text())
                except ValueError:
                    data = None
            if data is not None:
                results[step.name] = data
                step_rows = data.get("key", [])
                partial = False
            else:
                step_rows = streamed_rows(self.work / f"{step.name}.rows.jsonl")
                partial = True
            rows += [dict(step=step.name, **row, **({"partial": True} if partial else {})) for row in step_rows]
        return rows, results

    def gpu_tests(self) -> dict | None:
        path = self.logs / "gpu-tests.log"
        if not path.exists():
            return None
        outcomes: dict[str, list[str]] = {}
        for test, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", path.read_text(errors="replace"), re.M):
            outcomes.setdefault(outcome.lower(), []).append(test)
        failures = re.findall(r"^(?:FAILED|ERROR) (\S+::\S+)(?: - (.*))?$", path.read_text(errors="replace"), re.M)
        return dict(counts={k: len(v) for k, v in outcomes.items()},
                    failures=[dict(test=t, message=m[:300]) for t, m in failures] or
                    [dict(test=t, message="") for t in outcomes.get("failed", []) + outcomes.get("error", [])])

    def write(self, final: bool = False) -> None:
        """key.json, SUMMARY.md, logs.tar.gz and triton-cache.tar.gz, each written whole and renamed
        into place (a few seconds at most: the compiled kernels are some MiB)."""
        pack(self.logs, self.out / "logs.tar.gz")
        self.environment["triton_cache_packed"] = pack(self.triton_cache, self.out / "triton-cache.tar.gz",
                                                       keep=TRITON_CACHE_KEEP)
        rows, results = self.collect()
        smoke, config = results.get("smoke", {}), "tiny" if self.dry else "real"
        report = dict(
            suite="glmrt gpu_suite" + (" --key" if self.args.key else ""), format=1,
            state=self.state, overall=("PASS" if self.passed() else "FAIL") if final else "RUNNING",
            dry_run=self.dry, started=iso(self.started), updated=iso(time.time()),
            elapsed_s=round(time.time() - self.started, 1), budget_s=self.args.budget,
            environment=self.environment, machine=smoke.get("machine"),
            models=dict(glm_ocr=self.args.model or f"random weights, {config} config (written by the checkpoint step)",
                        glm_image=self.args.image_model or f"random weights, {config} config (image-checkpoint step)"),
            steps=[dict(name=s.name, status=s.status, exit=s.exit, seconds=s.seconds, timeout=s.timeout,
                        note=s.note or s.skip or "") for s in self.steps],
            key_numbers=rows, smoke_checks=smoke.get("checks"), gpu_tests=self.gpu_tests(), results=results)
        atomic_write(self.out / "key.json", json.dumps(report, indent=1, default=str) + "\n")
        atomic_write(self.out / "SUMMARY.md", summary_markdown(report))


# ---------------------------------------------------------------------------------- helpers


class UsageError(Exception):
    pass


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group (servers it started included), SIGKILL after a grace."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            if sig == signal.SIGTERM:  # the leader is gone; its group may not be
                os.killpg(process.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def streamed_rows(path: Path) -> list[dict]:
    """The rows a step appended as it made them, the last of each metric kept."""
    if not path.exists():
        return []
    by_metric = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut off by the kill
            continue
        by_metric[row.get("metric")] = row
    return list(by_metric.values())


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def atomic_write(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.replace(tmp, path)


_PACKED: dict[Path, tuple[tuple, str]] = {}  # target -> (what its folder held when packed, the note)


def pack(folder: Path, target: Path, keep: tuple[str, ...] | None = None) -> str:
    """folder -> a .tar.gz at `target` (only files ending in `keep`, when given), written whole;
    not again while the files are unchanged (the suite writes before and after every step). Over
    the device tool's 16 MiB per file, the newest files that fit are kept. -> a note."""
    files = sorted((p for p in folder.rglob("*") if p.is_file() and (keep is None or p.name.endswith(keep))),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    held = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if target in _PACKED and _PACKED[target][0] == held and target.exists():
        return _PACKED[target][1]
    while True:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
            for p in files:
                tar.add(p, arcname=str(p.relative_to(folder)))
        if buffer.tell() <= MAX_FILE_BYTES or not files:
            break
        files = files[: len(files) * 3 // 4]
    atomic_write(target, buffer.getvalue())
    _PACKED[target] = (held, f"{len(files)} files, {buffer.tell() / 2**20:.1f} MiB")
    return _PACKED[target][1]


def restore_triton_cache(tarball: Path, cache: Path) -> str:
    """Unpack a triton-cache.tar.gz of an earlier run into `cache`. Triton's group files name their
    members by absolute path: point them at where they now are."""
    with tarfile.open(tarball) as tar:
        tar.extractall(cache, filter="data")
    for group in cache.rglob("__grp__*.json"):
        data = json.loads(group.read_text())
        data["child_paths"] = {name: str(group.parent / Path(path).name) for name, path in data["child_paths"].items()}
        group.write_text(json.dumps(data))
    return f"{sum(1 for _ in cache.rglob('*.cubin'))} compiled kernels from {tarball}"


def environment(python: str, dry: bool) -> dict:
    """GPU, driver, versions and commit, read without importing glmrt (not installed yet)."""
    def run(*command: str) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    gpu = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader").splitlines()
    versions = run(python, "-c", "import importlib.metadata as m, platform, json, torch\n"
                   "def v(n):\n try: return m.version(n)\n except m.PackageNotFoundError: return None\n"
                   "print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__, "
                   "cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(), triton=v('triton'), "
                   "transformers=v('transformers'), pybind11=v('pybind11'))))")
    info = dict(gpu=gpu[0] if gpu else "none (dry run on the CPU)" if dry else "none", host=os.uname().nodename,
                cpus=os.cpu_count(), **(json.loads(versions.splitlines()[-1]) if versions else {}))
    git = ["git", "-c", "safe.directory=*", "-C", str(REPO)]
    commit = run(*git, "rev-parse", "HEAD")
    if commit:
        changed = run(*git, "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
        info.update(commit=commit, dirty=bool(changed))
    else:  # a copy of the tree without git metadata (the device tool's): the caller names it
        info.update(commit=os.environ.get("GLMRT_GIT_COMMIT", "unknown"), dirty=None)
    name = info["gpu"].split(",")[0].lower() if gpu else "cpu"
    slug = re.search(r"\b[a-z]{1,2}\d{2,3}\b", name)
    info["slug"] = slug.group(0) if slug else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return info


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}".strip()


def summary_markdown(r: dict) -> str:
    e = r["environment"]
    dirty = {True: " (dirty tree)", False: "", None: " (dirty state unknown)"}[e.get("dirty")]
    lines = [f"# glmrt GPU suite{' (dry run on the CPU: tiny sizes, numbers meaningless)' if r['dry_run'] else ''}", "",
             f"- overall: **{r['overall']}** ({r['state']}), {r['elapsed_s']:.0f} s of a {r['budget_s']} s budget; "
             f"updated {r['updated']}",
             f"- GPU: {e.get('gpu')}; CUDA {e.get('cuda')}; host {e.get('cpus')} CPUs",
             f"- python {e.get('python')}, torch {e.get('torch')}, triton {e.get('triton')}, "
             f"transformers {e.get('transformers')}",
             f"- commit `{e.get('commit')}`{dirty}",
             f"- models: GLM-OCR {r['models']['glm_ocr']}; GLM-Image {r['models']['glm_image']}"]
    if r["machine"]:
        m = r["machine"]
        lines.append(f"- measured ceilings: copy {fmt(m.get('copy_bandwidth_gbps'), 'GB/s')} (read + write), "
                     f"bf16 matmul {fmt(m.get('matmul_bf16_tflops'), 'TFLOP/s')}")
    for name in ("triton_cache_restored", "triton_cache_packed"):
        if e.get(name):
            lines.append(f"- {name.replace('_', ' ')}: {e[name]}")
    lines += ["", "## Steps", "", "| step | status | seconds | limit | note |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {fmt(s['seconds'])} | {fmt(s['timeout'])} | {s['note'].replace('|', '/')} |"
              for s in r["steps"]]
    lines += ["", "## Key numbers", "",
              "vs peer > 1: glmrt ahead of its peer (same run, same device). Floors: the bytes a step must read "
              "(weights; weights + KV) over the copy bandwidth measured on this machine; 100% is the floor.", "",
              "| step | metric | glmrt | peer | vs peer | floors: % of |", "|---|---|---|---|---|---|"]
    for row in r["key_numbers"]:
        peer = f"{fmt(row.get('peer'), row['unit'])} ({row.get('peer_name')})" if row.get("peer") is not None else "-"
        vs = f"{row['vs_peer']:.2f}x" if row.get("vs_peer") is not None else "-"
        floors = "; ".join(f"{f['pct']:.0f}% of {fmt(f['value'], row['unit'])} ({f['basis']})"
                           for f in row.get("floors", [])) or "-"
        partial = " (partial: step cut off)" if row.get("partial") else ""
        lines.append(f"| {row['step']} | {row['metric']}{partial} | {fmt(row['glmrt'], row['unit'])} | {peer} | {vs} | "
                     f"{floors} |")
    if r["smoke_checks"]:
        lines += ["", "## Smoke: steps without host-device waits", "", "| case | batch | result |", "|---|---|---|"]
        lines += [f"| {c['case']} | {c['batch']} | {'ok' if c['ok'] else '; '.join(c['errors']).replace('|', '/')} |"
                  for c in r["smoke_checks"]]
    if r["gpu_tests"]:
        t = r["gpu_tests"]
        lines += ["", "## GPU tests", "", "- " + (", ".join(f"{n} {k}" for k, n in sorted(t["counts"].items())) or "none ran")]
        lines += [f"- FAILED {f['test']}{': ' + f['message'] if f['message'] else ''}" for f in t["failures"]]
    lines += ["", "Files: key.json (all of this, and each benchmark's full results), logs.tar.gz (every step's output), "
              "triton-cache.tar.gz (compiled kernels; --triton-cache next time)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_suite.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key", action="store_true", help=f"the key numbers only, inside {KEY_BUDGET} s (one lease)")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<UTC date-time>-<gpu>)")
    parser.add_argument("--model", help="GLM-OCR checkpoint (path or Hub id); default: random weights, real config")
    parser.add_argument("--image-model", help="GLM-Image checkpoint root (path or Hub id); default: random weights")
    parser.add_argument("--budget", type=int, help=f"seconds for all steps (default {KEY_BUDGET} with --key, else {FULL_BUDGET})")
    parser.add_argument("--work", help="folder for checkpoints and scratch, kept (default: a temp folder, removed)")
    parser.add_argument("--triton-cache", help="a triton-cache.tar.gz of an earlier run: kernels compiled then are reused")
    parser.add_argument("--only", default="", help="run only these steps (comma-separated; see --list)")
    parser.add_argument("--skip", default="", help="skip these steps (comma-separated)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes (tests the suite)")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = KEY_BUDGET if args.key else FULL_BUDGET
    if args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.triton_cache and not Path(args.triton_cache).is_file():
        parser.error(f"--triton-cache: no such file {args.triton_cache}")
    args.only = {s for s in args.only.split(",") if s}
    args.skip = {s for s in args.skip.split(",") if s}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        suite = Suite(args)
    except UsageError as exc:
        print(f"gpu_suite: {exc}", file=sys.stderr)
        return 2
    def interrupted(*_):
        raise KeyboardInterrupt

    try:
        if args.list:
            print(suite.listing())
            return 0
        suite.environment = environment(suite.python, suite.dry)
        if not suite.dry and not suite.environment.get("cuda_available"):
            print(f"gpu_suite: no CUDA GPU ({suite.environment['gpu']}; torch sees none): this suite needs one, "
                  "and --dry-run runs it on the CPU with tiny sizes", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, interrupted)
        return suite.run()
    finally:
        if not args.work:
            shutil.rmtree(suite.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

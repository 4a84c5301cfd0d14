"""The repository root is never importable, in the tests or in what they start from it.

Its top-level `kernels/` folder (installed as glmrt.kernels) would otherwise be imported as
`kernels` in place of the Hub's package that transformers imports, and every model load fails.
The other places it could come in are tested where they run from the root: the console script
(test_parse.py), Ray workers (test_ray.py), the benchmarks (test_gpu_suite.py)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from glmrt_testing import REPO
from glmrt_testing.tiny_layout import build_tiny_layout_checkpoint


def test_the_repository_root_is_not_on_the_path(tmp_path):
    """Fails once the root is back on sys.path: `pythonpath = ["."]`, prepend import mode, or
    conftest's filter of `python -m pytest`'s working directory dropped."""
    assert REPO not in {Path(p or ".").resolve() for p in sys.path}
    spec = importlib.util.find_spec("kernels")
    assert spec is None or REPO not in Path(spec.origin).parents, f"`kernels` is {spec.origin}"
    import transformers
    from transformers.integrations import hub_kernels  # imports the Hub's `kernels` where installed

    import glmrt.kernels.rmsnorm

    assert transformers.__version__ and hub_kernels and glmrt.kernels.rmsnorm
    from glmrt.documents.layout import LayoutDetector

    LayoutDetector.from_pretrained(build_tiny_layout_checkpoint(tmp_path / "layout"), device="cpu")


def test_the_readme_command_from_the_root_with_a_stub_kernels(tmp_path):
    """`python -m pytest` started in the repository root (its working directory first on sys.path)
    runs the test above, with a `kernels` package of its own on the path where the Hub's is not
    installed: a shadowed one is found by location either way."""
    env = None
    if importlib.util.find_spec("kernels") is None:
        stub = tmp_path / "stub" / "kernels"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text("STUB = True\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(stub.parent), os.environ.get("PYTHONPATH")]))}
    test = "tests/test_import_path.py::test_the_repository_root_is_not_on_the_path"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout


def test_the_readme_tiny_checkpoint_script_runs_from_the_root(tmp_path):
    """`python tests/support/write_tiny_checkpoints.py DIR`, the README's way to try glmrt serve
    and glmrt parse without a download: a script's own folder goes on sys.path, not the root."""
    done = subprocess.run([sys.executable, "tests/support/write_tiny_checkpoints.py", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(tmp_path / "glm-ocr"), str(tmp_path / "pp-doclayout-v3")]
    import glmrt

    assert glmrt.LLM(str(tmp_path / "glm-ocr"), device="cpu").generate(
        {"prompt": "Text Recognition:", "images": []}, glmrt.SamplingParams(max_tokens=2))[0].token_ids

"""The README's glmocr SDK recipes, run as printed (the SDK's own `glmocr` command) against a real
`glmrt serve` process: only its address, API key and, for the self-hosted mode, the layout model
(the SDK would fetch PP-DocLayoutV3 from the Hub) are put in."""
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import glmrt
from glmrt.documents.layout import LayoutDetector
from glmrt.documents.pipeline import DocumentParser
from glmrt_testing import REPO, subprocess_env
from glmrt_testing.documents import make_images, make_pdf
from glmrt_testing.server_process import ServerProcess

pytest.importorskip("glmocr")
README_URL = "http://127.0.0.1:8080"


def readme_command(prefix: str) -> list[str]:
    """The README's one command line that starts with `prefix`."""
    lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines() if line.strip().startswith(prefix)]
    assert len(lines) == 1, f"README: {len(lines)} lines start with {prefix!r}"
    return shlex.split(lines[0])


# The `glmocr` console script, with the tests' torchvision on the path first (the SDK's own layout
# step needs it; see glmrt_testing.vendored_torchvision).
GLMOCR = ("import sys; from glmrt_testing.vendored_torchvision import use_vendored_torchvision; "
          "use_vendored_torchvision(); from glmocr.cli import main; sys.argv[0] = 'glmocr'; sys.exit(main())")


def run_glmocr(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert argv[0] == "glmocr", argv
    done = subprocess.run([sys.executable, "-c", GLMOCR, *argv[1:]], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.filterwarnings("ignore:The `fitz` API is deprecated:FutureWarning")
def test_glmocr_sdk_recipes_as_printed(tiny_checkpoint, tiny_layout_checkpoint, tmp_path):
    layout = tiny_layout_checkpoint
    make_pdf(tmp_path / "maas" / "report.pdf", pages=1, size=(300, 380), seed=3)
    page = tmp_path / "selfhosted" / "page.png"
    page.parent.mkdir()
    shutil.copy(next(p for p in make_images(tmp_path / "images") if p.name == "scan.png"), page)
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", max_model_len=256)
    expected, = DocumentParser(llm, LayoutDetector.from_pretrained(layout, device="cpu")).parse(
        [tmp_path / "maas" / "report.pdf"], tmp_path / "expected")

    with ServerProcess(tiny_checkpoint, "--layout-model", str(layout), "--max-model-len", "256",
                       "--api-key", "sesame") as server:
        maas = readme_command("glmocr parse report.pdf --mode maas")
        maas = [arg.replace(README_URL, server.url) for arg in maas]
        maas[maas.index("--api-key") + 1] = "sesame"
        run_glmocr(maas, cwd=tmp_path / "maas")
        saved = tmp_path / "maas" / "output" / "report" / "report.md"
        assert saved.read_text(encoding="utf-8") == expected.markdown_path.read_text(encoding="utf-8")

        selfhosted = readme_command("glmocr parse page.png --mode selfhosted")
        selfhosted[selfhosted.index("pipeline.ocr_api.api_port") + 1] = str(server.port)
        run_glmocr([*selfhosted, "--set", "pipeline.ocr_api.api_key", "sesame",
                    "--set", "pipeline.layout.model_dir", str(layout), "--layout-device", "cpu"],
                   cwd=page.parent)
    assert re.search(r"\S", (page.parent / "output" / "page" / "page.md").read_text(encoding="utf-8"))

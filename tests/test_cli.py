"""`glmrt ocr` end to end on the tiny checkpoint, through the installed console script."""
import json
import shutil
import subprocess
import sys

import pytest

from glmrt.cli import main
from tests.helpers import IMAGES


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    paths = []
    for name in ("small", "wide"):
        IMAGES[name].save(d / f"{name}.png")
        paths.append(str(d / f"{name}.png"))
    return paths


def test_console_script_prints_text(tiny_checkpoint, image_files):
    exe = shutil.which("glmrt")
    cmd = [exe] if exe else [sys.executable, "-m", "glmrt.cli"]
    done = subprocess.run(cmd + ["ocr", image_files[0], "--model", str(tiny_checkpoint), "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_json_output_and_tasks(tiny_checkpoint, image_files, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text('{"title": ""}')
    assert main(["ocr", *image_files, "--model", str(tiny_checkpoint), "--schema", str(schema),
                 "--json", "--max-tokens", "5", "--backend", "torch"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == image_files
    assert all(r["num_tokens"] <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert main(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--task", "table", "--max-tokens", "3"]) == 0


def test_errors_are_clear(tiny_checkpoint, tmp_path, capsys):
    assert main(["ocr", str(tmp_path / "missing.png"), "--model", str(tiny_checkpoint)]) == 2
    assert "no such image file" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["ocr", str(bad), "--model", str(tiny_checkpoint)]) == 1
    assert "error:" in capsys.readouterr().err

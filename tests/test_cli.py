"""`glmrt ocr` end to end on the tiny checkpoint: in-process through main(), and as a real process
for the console script, `python -m glmrt`, missing-driver errors and Ctrl-C."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from PIL import Image

import glmrt
from glmrt.cli import main
from glmrt.engine.engine import LLMEngine
from glmrt_testing import SUPPORT, glmrt_command
from glmrt_testing.helpers import IMAGES

TORCH_CPU = ["--backend", "torch", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    paths = []
    for name in ("small", "wide"):
        IMAGES[name].save(d / f"{name}.png")
        paths.append(str(d / f"{name}.png"))
    return paths


def run_glmrt(args, env=None, **kw):
    return subprocess.run(glmrt_command(*args), capture_output=True, text=True, timeout=300, env=env, **kw)


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("glmrt: error:")]


def test_console_script_prints_text(tiny_checkpoint, image_files):
    done = run_glmrt(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--max-tokens", "8"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_json_output_and_tasks(tiny_checkpoint, image_files, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text('{"title": ""}')
    assert main(["ocr", *image_files, "--model", str(tiny_checkpoint), "--schema", str(schema),
                 "--json", "--max-tokens", "5", *TORCH_CPU]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(image_files)  # completion order
    assert all(set(r) == {"image", "text", "finish_reason", "num_tokens"} for r in rows)
    assert all(r["num_tokens"] <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert main(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--task", "table", "--max-tokens", "3"]) == 0


def test_schema_file_constrains_the_output(tiny_checkpoint, image_files, tmp_path, capsys):
    """A JSON Schema file: every image's text validates. A template file: the output follows it
    from its first token (random weights need not close its unbounded strings in a few tokens)."""
    import jsonschema

    schema = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 6}}, "required": ["title"],
              "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    assert main(["ocr", *image_files, "--model", str(tiny_checkpoint), "--schema", str(path), "--json",
                 "--max-tokens", "300", *TORCH_CPU]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(image_files) and all(r["finish_reason"] == "stop" for r in rows)
    for r in rows:
        jsonschema.validate(json.loads(r["text"]), schema)
    template = tmp_path / "template.json"
    template.write_text('{"标题": ""}')
    assert main(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--schema", str(template),
                 "--max-tokens", "4", *TORCH_CPU]) == 0
    assert capsys.readouterr().out.startswith("{")


def test_bad_images_fail_alone(tiny_checkpoint, image_files, tmp_path, capsys):
    missing, bad = str(tmp_path / "missing.png"), tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["ocr", image_files[0], missing, str(bad), image_files[1], "--model", str(tiny_checkpoint),
                 "--max-tokens", "3", *TORCH_CPU]) == 1
    out, err = capsys.readouterr()
    for path in image_files:
        assert f"==> {path} <==" in out
    assert missing not in out and str(bad) not in out
    errors = error_lines(err)
    assert len(errors) == 2, err
    assert any(line.startswith(f"glmrt: error: {missing}: ") for line in errors)
    assert any(line.startswith(f"glmrt: error: {bad}: ") for line in errors)
    assert "Traceback" not in err


def test_results_stream_as_each_image_finishes(tiny_checkpoint, image_files, monkeypatch):
    """With one sequence at a time, the first image's row must be written before the last step runs."""
    events = []
    step = LLMEngine.step

    def recording_step(self):
        events.append("step")
        return step(self)

    class Stdout(io.StringIO):
        def write(self, text):
            if text.strip():
                events.append(text)
            return super().write(text)

    monkeypatch.setattr(LLMEngine, "step", recording_step)
    monkeypatch.setattr(sys, "stdout", Stdout())
    assert main(["ocr", *image_files, image_files[0], "--model", str(tiny_checkpoint), "--json", "--max-tokens", "4",
                 "--max-num-seqs", "1", *TORCH_CPU]) == 0
    rows = [json.loads(e) for e in events if e != "step"]
    assert sorted(r["image"] for r in rows) == sorted([*image_files, image_files[0]])
    last_step = max(i for i, e in enumerate(events) if e == "step")
    assert events.index(next(e for e in events if e != "step")) < last_step


def test_usage_errors_exit_2(tiny_checkpoint, image_files, tmp_path, capsys):
    schema = tmp_path / "schema.txt"
    schema.write_text("title: string")
    assert main(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--schema", str(schema)]) == 2
    assert f"--schema {schema} is not valid JSON" in capsys.readouterr().err
    assert main(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--schema", str(tmp_path / "none")]) == 2
    assert "cannot read --schema" in capsys.readouterr().err
    schema.write_text('{"type": "object", "properties": {"a": {"type": "bogus"}}}')
    assert main(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--schema", str(schema)]) == 2
    err = capsys.readouterr().err
    assert f"--schema {schema} cannot be used as a constraint" in err and "bogus" in err and len(err.splitlines()) == 1
    for flags, shown in [(["--max-tokens", "0"], "--max-tokens 0"), (["--top-p", "2"], "--top-p 2.0"),
                         (["--temperature", "nan"], "--temperature nan"), (["--max-num-seqs", "0"], "max_num_seqs")]:
        assert main(["ocr", image_files[0], "--model", str(tiny_checkpoint), *flags]) == 2
        assert shown in capsys.readouterr().err
    assert main(["ocr", image_files[0], "--no-such-flag"]) == 2
    assert main(["ocr"]) == 2


def test_serve_usage_errors_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for a usage error")

    monkeypatch.setattr(LLMEngine, "__init__", no_load)
    model = str(tmp_path)  # never read
    for flags, shown in [(["--allowed-local-media-path", str(tmp_path / "none")], "is not a directory"),
                         (["--max-queue", "-1"], "max_queue"), (["--max-num-seqs", "0"], "max_num_seqs"),
                         (["--block-size", "24"], "block_size"), (["--max-images-per-request", "-2"], "max_images"),
                         (["--layout-model", str(tmp_path / "no-such-dir")], "--layout-model")]:
        assert main(["serve", model, *flags]) == 2
        assert shown in capsys.readouterr().err
    assert main(["serve", model, "--image-backend", "cv2"]) == 2


def test_parse_usage_errors_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for a usage error")

    monkeypatch.setattr(LLMEngine, "__init__", no_load)
    page = tmp_path / "page.png"
    Image.new("RGB", (64, 48), "white").save(page)
    base = ["parse", str(page), "-o", str(tmp_path / "out"), "--model", str(tmp_path)]
    for flags, shown in [(["--layout-model", "./no/such/layout"], "--layout-model './no/such/layout' is neither"),
                         (["--dpi", "0"], "--dpi"), (["--max-tokens", "0"], "--max-tokens"),
                         (["--max-num-seqs", "0"], "max_num_seqs")]:
        assert main([*base, *flags]) == 2
        assert shown in capsys.readouterr().err
    assert main(["parse", str(tmp_path / "missing.pdf"), "-o", str(tmp_path / "out"), "--model", str(tmp_path)]) == 2
    assert "missing.pdf: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_version_and_default_model(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"glmrt {glmrt.__version__}"
    from glmrt.cli import _parser

    assert _parser().parse_args(["ocr", "a.png"]).model == "zai-org/GLM-OCR"
    done = subprocess.run([sys.executable, "-m", "glmrt", "--version"], capture_output=True, text=True, timeout=300,
                          cwd=SUPPORT)  # `python -m` puts its working directory on sys.path
    assert done.returncode == 0 and done.stdout.strip() == f"glmrt {glmrt.__version__}"


@pytest.mark.parametrize("file,content", [("tokenizer.json", '{"model": '),
                                          ("chat_template.jinja", "{% for m in messages %}{{ m.content }"),
                                          ("config.json", "[]")])
def test_broken_checkpoint_is_one_line(tiny_checkpoint, image_files, tmp_path, capsys, monkeypatch, file, content):
    path = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (path / file).write_text(content)
    assert main(["ocr", image_files[0], "--model", str(path), "--max-tokens", "2", *TORCH_CPU]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("glmrt: error: "), err
    monkeypatch.setenv("GLMRT_DEBUG", "1")  # full traceback on request
    with pytest.raises(Exception):
        main(["ocr", image_files[0], "--model", str(path), "--max-tokens", "2", *TORCH_CPU])


def test_triton_backend_without_gpu_is_one_line(tiny_checkpoint, image_files):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = run_glmrt(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--max-tokens", "2",
                      "--backend", "triton", "--device", "cpu"], env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert len(error_lines(done.stderr)) == 1, done.stderr


def test_ctrl_c_exits_130_without_traceback(tiny_checkpoint, image_files):
    """One image at a time, all the same (so each runs as long as the first): SIGINT lands once
    the first result is out, while the second image is being generated."""
    proc = subprocess.Popen(
        glmrt_command("ocr", *[image_files[0]] * 3, "--model", str(tiny_checkpoint), "--json", "--max-tokens", "40",
                      "--max-num-seqs", "1", *TORCH_CPU),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = proc.stdout.readline()
        assert json.loads(first)["num_tokens"] > 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "glmrt: interrupted"
    assert len(out.splitlines()) < 2  # the images still running or queued were abandoned


@pytest.mark.parametrize("argv, flags", [
    (["parse", "doc.pdf", "-o", "out", "--ray-actors", "2"], "--ray-actors needs --ray"),
    (["serve", "--ray-max-replicas", "3", "--ray-min-replicas", "0"], "--ray-min-replicas, --ray-max-replicas need --ray"),
])
def test_ray_flags_without_ray_are_refused(argv, flags, capsys):
    assert main(argv) == 2
    assert flags in capsys.readouterr().err

"""`glmrt ocr` end to end on the tiny checkpoint: in-process through main(), and as a real process
for the console script, `python -m glmrt`, missing-driver errors, Ctrl-C and the progress shown
on a terminal."""
import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from PIL import Image

import glmrt
from glmrt.cli import main
from glmrt.documents import DEFAULT_LAYOUT_MODEL
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
    # 5 tokens cannot complete the JSON: exit 1 (see test_outputs_cut_at_max_tokens_are_reported)
    assert main(["ocr", *image_files, "--model", str(tiny_checkpoint), "--schema", str(schema),
                 "--json", "--max-tokens", "5", *TORCH_CPU]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(image_files)  # completion order
    assert all(set(r) == {"image", "text", "finish_reason", "num_tokens"} for r in rows)
    assert all(r["num_tokens"] == 5 and r["finish_reason"] == "length" for r in rows)
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
                 "--max-tokens", "4", *TORCH_CPU]) == 1  # incomplete JSON
    assert capsys.readouterr().out.startswith("{")


def test_outputs_cut_at_max_tokens_are_reported(tiny_checkpoint, image_files, tmp_path, capsys):
    """Text cut at the token limit is printed with one warning line per image (exit 0); with
    --schema it is incomplete JSON: printed as far as it got, one error line per image, exit 1.
    The line names the flag whose limit ended it."""
    assert main(["ocr", *image_files, "--model", str(tiny_checkpoint), "--max-tokens", "3", *TORCH_CPU]) == 0
    out, err = capsys.readouterr()
    assert all(f"==> {path} <==" in out for path in image_files)
    assert sorted(err.splitlines()) == sorted(
        f'glmrt: warning: {path}: cut at --max-tokens (3 tokens, finish_reason "length"): raise it for the rest'
        for path in image_files)
    template = tmp_path / "template.json"
    template.write_text('{"title": ""}')
    assert main(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--schema", str(template),
                 "--max-tokens", "4", *TORCH_CPU]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("{")
    assert err.splitlines() == [
        f'glmrt: error: {image_files[0]}: incomplete JSON, cut at --max-tokens (4 tokens, finish_reason "length"): '
        "raise it"]
    prompt = glmrt.Processor.from_pretrained(tiny_checkpoint)(images=[image_files[0]], prompt="Text Recognition:")
    max_model_len = len(prompt.input_ids) + 2
    assert main(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--max-model-len", str(max_model_len),
                 "--max-tokens", "50", *TORCH_CPU]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f'glmrt: warning: {image_files[0]}: cut at --max-model-len (2 tokens, finish_reason "length"): '
        "raise it for the rest"]


def test_bad_images_fail_alone(tiny_checkpoint, image_files, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["ocr", image_files[0], str(bad), image_files[1], "--model", str(tiny_checkpoint),
                 "--max-tokens", "3", *TORCH_CPU]) == 1
    out, err = capsys.readouterr()
    for path in image_files:
        assert f"==> {path} <==" in out
    assert str(bad) not in out
    [error] = error_lines(err)
    assert error.startswith(f"glmrt: error: {bad}: ")
    assert "Traceback" not in err


def test_inputs_that_are_not_images_exit_2_before_the_model_loads(image_files, tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for a usage error")

    monkeypatch.setattr(LLMEngine, "__init__", no_load)
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n")
    for given, problem in [(tmp_path / "nope.png", "no such file"),
                           (tmp_path, "is a directory; glmrt ocr takes image files (glmrt parse takes directories)"),
                           (pdf, f"is a PDF; glmrt ocr takes images, glmrt parse takes PDFs: glmrt parse {pdf}")]:
        assert main(["ocr", image_files[0], str(given), "--model", str(tmp_path)]) == 2
        assert capsys.readouterr().err.splitlines() == [f"glmrt: error: {given}: {problem}"]


def test_hub_models_that_cannot_be_fetched_name_their_flag(tiny_checkpoint, image_files, tmp_path, capsys,
                                                           monkeypatch):
    """Offline, a Hub id fails before anything loads, in one line naming the model and the flag
    that gives a local copy instead: glmrt ocr's --model here, glmrt parse's default layout model
    in a real offline process below."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    def no_load(*args, **kwargs):
        raise AssertionError("nothing loads before the models are fetched")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(LLMEngine, "__init__", no_load)
    assert main(["ocr", image_files[0]]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "glmrt: error: could not resolve Hub model 'zai-org/GLM-OCR': outgoing traffic has been disabled; "
        "to run without the Hub, give a local copy: --model DIR"]
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    done = run_glmrt(["parse", image_files[0], "-o", str(out), "--model", str(tiny_checkpoint)], env=env)
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"glmrt: error: could not resolve Hub layout model '{DEFAULT_LAYOUT_MODEL}': ")
    assert line.endswith("to run without the Hub, give a local copy: --layout-model DIR")
    assert not out.exists()


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
    capsys.readouterr()
    for argv in (["ocr", image_files[0], "--max-token", "5"], ["parse", "doc.pdf", "--max-token", "5"]):
        assert main(argv) == 2  # flags are taken only in full; the subcommand's usage is shown
        err = capsys.readouterr().err
        assert err.startswith(f"usage: glmrt {argv[0]} ") and "unrecognized arguments: --max-token 5" in err


def test_serve_usage_errors_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for a usage error")

    monkeypatch.setattr(LLMEngine, "__init__", no_load)
    model = str(tmp_path)  # never read
    for flags, shown in [(["--allowed-local-media-path", str(tmp_path / "none")], "is not a directory"),
                         (["--max-queue", "-1"], "max_queue"), (["--max-num-seqs", "0"], "max_num_seqs"),
                         (["--block-size", "24"], "block_size"), (["--max-images-per-request", "-2"], "max_images"),
                         (["--layout-model", str(tmp_path / "no-such-dir")], "--layout-model"),
                         (["--grammar-timeout", "0"], "grammar_timeout_s"), (["--max-connections", "0"], "max_connections"),
                         (["--max-connections", str(10**9)], "open files"), (["--header-timeout", "-1"], "header_timeout_s"),
                         (["--max-header-bytes", "0"], "max_header_bytes"),
                         (["--ray", "--max-connections", "10"], "Ray Serve's proxy")]:
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


def test_parse_draft_sets_the_engine_options_the_speculative_flags_override(tmp_path, capsys, monkeypatch):
    """--draft auto (default), text, ngram: 8 tokens from the PDF's text and n-gram lookup, no MTP
    layer; mtp: 3 MTP tokens; off: no speculation. Speculative flags, when given, set the engine
    instead; --draft mtp on an engine without the MTP layer is a usage error naming --draft."""
    from glmrt.documents import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "parse", lambda inputs, output, **kwargs: calls.append(kwargs) or [])
    page = tmp_path / "page.png"
    Image.new("RGB", (64, 48), "white").save(page)
    base = ["parse", str(page), "-o", str(tmp_path / "out"), "--model", str(tmp_path), "--no-layout"]
    lookup, mtp = {"num_speculative_tokens": 8, "speculative_method": "ngram"}, {"num_speculative_tokens": 3,
                                                                                  "speculative_method": "mtp"}
    for flags, draft, options in [([], "auto", lookup), (["--draft", "text"], "text", lookup),
                                  (["--draft", "ngram"], "ngram", lookup), (["--draft", "mtp"], "mtp", mtp),
                                  (["--draft", "off"], "off", {}),
                                  (["--num-speculative-tokens", "4"], "auto", {"num_speculative_tokens": 4}),
                                  (["--draft", "text", "--speculative-config", '{"method": "ngram", '
                                    '"num_speculative_tokens": 5}'], "text",
                                   {"num_speculative_tokens": 5, "speculative_method": "ngram"})]:
        assert main([*base, *flags]) == 0, capsys.readouterr().err
        given = {k: v for k, v in calls.pop().items() if k in ("draft", "num_speculative_tokens", "speculative_method")}
        assert given == {"draft": draft, **options}, flags
    for flags in (["--draft", "mtp", "--speculative-method", "ngram", "--num-speculative-tokens", "4"],
                  ["--draft", "mtp", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}']):
        assert main([*base, *flags]) == 2
        assert "--draft mtp" in capsys.readouterr().err
    assert main([*base, "--draft", "everything"]) == 2 and "--draft" in capsys.readouterr().err
    assert calls == []


def test_no_batch_invariant_reaches_the_engine(tmp_path, capsys, monkeypatch):
    """Batch-invariant kernels are the default; --no-batch-invariant turns them off."""
    from glmrt.documents import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "parse", lambda inputs, output, **kwargs: calls.append(kwargs) or [])
    page = tmp_path / "page.png"
    Image.new("RGB", (64, 48), "white").save(page)
    base = ["parse", str(page), "-o", str(tmp_path / "out"), "--model", str(tmp_path), "--no-layout"]
    assert main(base) == 0 and "batch_invariant" not in calls.pop(), capsys.readouterr().err
    assert main([*base, "--no-batch-invariant"]) == 0 and calls.pop()["batch_invariant"] is False


def test_version_and_default_model(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"glmrt {glmrt.__version__}"
    from glmrt.cli import _parser

    assert _parser().parse_args(["ocr", "a.png"]).model == "zai-org/GLM-OCR"
    assert _parser().parse_args(["parse", "a.pdf"]).output == Path("output")  # the glmocr SDK's
    done = subprocess.run([sys.executable, "-m", "glmrt", "--version"], capture_output=True, text=True, timeout=300,
                          cwd=SUPPORT)  # `python -m` puts its working directory on sys.path
    assert done.returncode == 0 and done.stdout.strip() == f"glmrt {glmrt.__version__}"


def test_help_version_and_usage_errors_do_not_import_torch(tmp_path):
    """They answer at once: torch, the engine, the server and the document pipeline are imported
    only by the subcommand that runs. A fresh process, as this one has torch already."""
    heavy = ["torch", "glmrt.llm", "glmrt.engine", "glmrt.server", "glmrt.documents.layout"]
    code = ("import sys\nfrom glmrt.cli import main\n"
            "codes = [main(argv) for argv in (['--version'], ['--help'], ['ocr', '--help'], ['parse', '--help'], "
            "['serve', '--help'], ['ocr', 'a.png', '--bogus'], ['ocr'])]\n"
            f"print(codes, [m for m in {heavy!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # `python -c` puts its working directory on sys.path
    assert done.stdout.splitlines()[-1] == "[0, 0, 0, 0, 0, 2, 2] []", done.stdout[-2000:] + done.stderr


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
    # The second image, running (unless SIGINT came before it was queued), is printed with what it
    # had, as interrupted; the third, queued, never started.
    interrupted = [json.loads(line) for line in out.splitlines()]
    assert len(interrupted) <= 1, out
    assert all(r["image"] == image_files[0] and r["finish_reason"] == "abort" for r in interrupted)


def test_ctrl_c_inside_a_step_prints_the_text_read_before_it(tiny_checkpoint, image_files, capsys, monkeypatch):
    """An interrupt inside a model step fails that step's requests in the engine, so abort() finds
    nothing left: the text read before the step is printed."""
    from glmrt.engine.runner import ModelRunner

    assert main(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--json", "--max-tokens", "12",
                 *TORCH_CPU]) == 0
    full = json.loads(capsys.readouterr().out)
    launch, calls = ModelRunner.launch, []

    def interrupted(self, *args, **kwargs):
        calls.append(None)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "launch", interrupted)
    assert main(["ocr", image_files[0], "--model", str(tiny_checkpoint), "--json", "--max-tokens", "12",
                 *TORCH_CPU]) == 130
    out, err = capsys.readouterr()
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["finish_reason"] == "abort" and 0 < row["num_tokens"] < full["num_tokens"]
    assert row["text"] and full["text"].startswith(row["text"])
    assert err.splitlines()[-1] == "glmrt: interrupted"


def test_a_single_image_shows_its_tokens_on_a_terminal_and_ctrl_c_prints_its_text(tiny_checkpoint, image_files):
    """stderr a terminal: a progress bar counts the tokens of the one image. SIGINT once it shows
    some: the text so far is printed, marked as interrupted, and the exit status is 130."""
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm needs a width
    proc = subprocess.Popen(glmrt_command("ocr", image_files[0], "--model", str(tiny_checkpoint),
                                          "--max-tokens", "3000", *TORCH_CPU),
                            stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    shown = b""
    try:
        while not re.search(rb" [1-9][0-9]*/3000 \[", shown):  # tqdm's " 12/3000 [00:01<..., 9.5token/s]"
            assert select.select([master], [], [], 120)[0], shown
            shown += os.read(master, 4096)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        while select.select([master], [], [], 5)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the process has closed its end
                break
            if not chunk:
                break
            shown += chunk
    finally:
        proc.kill()
        os.close(master)
    assert proc.returncode == 130, shown
    assert b"token/s" in shown and b"Traceback" not in shown
    assert shown.decode(errors="replace").splitlines()[-1] == "glmrt: interrupted"
    header, text = out.split("\n", 1)
    assert header == f"==> {image_files[0]} (interrupted) <==" and text.strip()


def test_serve_prints_what_it_runs_at_startup(tiny_checkpoint):
    """One line whatever --log-level says (the test server runs at warning): the served names and
    what the engine defaults came to."""
    from glmrt_testing.server_process import ServerProcess

    with ServerProcess(tiny_checkpoint, "--max-model-len", "1024", "--kv-cache-tokens", "2048") as server:
        log = server.read_log()
    [line] = [line for line in log.splitlines() if line.startswith("glmrt: serving ")]
    assert line == (f"glmrt: serving {tiny_checkpoint} as glm-ocr, {tiny_checkpoint} on {server.url}: device cpu, "
                    "dtype float32, backend torch, max_model_len 1024, KV cache 2048 tokens")


@pytest.mark.parametrize("argv, flags", [
    (["parse", "doc.pdf", "-o", "out", "--ray-actors", "2"], "--ray-actors needs --ray"),
    (["serve", "--ray-max-replicas", "3", "--ray-min-replicas", "0"], "--ray-min-replicas, --ray-max-replicas need --ray"),
])
def test_ray_flags_without_ray_are_refused(argv, flags, capsys):
    assert main(argv) == 2
    assert flags in capsys.readouterr().err

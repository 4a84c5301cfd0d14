"""glmrt on Ray, on CPU: a local Ray instance with 2 CPUs started here, tiny random GLM-OCR and
PP-DocLayoutV3 checkpoints. `glmrt parse --ray` writes the bytes single-process `glmrt parse`
writes, once per document, also when its recognition actor is killed mid-job; `glmrt serve --ray`
answers as `glmrt serve` does."""
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter

import httpx
import pytest

import glmrt
from glmrt.documents import pipeline
from glmrt.documents.layout import LayoutDetector
from glmrt.documents.pipeline import DocumentParser
from glmrt_testing import REPO, glmrt_command
from glmrt_testing.documents import make_corrupt_pdf, make_images, make_pdf
from glmrt_testing.server_process import ServerProcess

ray = pytest.importorskip("ray")
ray_jobs = pytest.importorskip("glmrt.ray.jobs")

MAX_TOKENS = 6
ACTOR_TITLE = b"ray::MapWorker(MapBatches(PageRecognizer))"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs -> its address (for a second process to join)."""
    glmrt.ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """20 small documents in two folders: 13 PDFs of 1-3 pages, 6 images, 1 corrupt PDF."""
    root = tmp_path_factory.mktemp("ray-docs")
    for i in range(13):
        make_pdf(root / ("a" if i < 7 else "b") / f"doc{i:02d}.pdf", pages=1 + i % 3, size=(300, 380), seed=10 + i)
    make_images(root / "b" / "scans")
    make_corrupt_pdf(root / "a" / "broken.pdf")
    return root


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, tiny_layout_checkpoint, documents, tmp_path_factory):
    """What single-process `glmrt parse` writes for the 20 documents -> (results, files)."""
    out = tmp_path_factory.mktemp("single")
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", max_num_seqs=16)
    results = DocumentParser(llm, LayoutDetector.from_pretrained(tiny_layout_checkpoint, device="cpu"),
                             max_tokens=MAX_TOKENS).parse([documents / "a", documents / "b"], out)
    assert len(results) == 20
    return results, files(out)


def files(folder):
    """Every file under folder -> its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def ray_parse(inputs, out, tiny_checkpoint, tiny_layout_checkpoint, **options):
    return glmrt.ray.parse(inputs, out, model=str(tiny_checkpoint), layout_model=str(tiny_layout_checkpoint), device="cpu",
                           dtype="float32", max_tokens=MAX_TOKENS, max_num_seqs=16, progress=False, **options)


@pytest.fixture
def writes(monkeypatch):
    """Documents written by this process -> how often each."""
    counts = Counter()
    write = pipeline.write_document

    def counted(folder, name, *args, **kwargs):
        counts[name] += 1
        return write(folder, name, *args, **kwargs)

    monkeypatch.setattr(pipeline, "write_document", counted)
    return counts


def test_ray_job_writes_what_glmrt_parse_writes(cluster, tiny_checkpoint, tiny_layout_checkpoint, documents, expected,
                                                tmp_path, writes, monkeypatch):
    """Inputs as a file:// URI (pyarrow) and a folder inside a zip (fsspec's chained zip:// URI);
    the same files, byte for byte, each document written once, the corrupt PDF reported (the job
    goes on); a re-run redoes only what is not written."""
    single, expected_files = expected
    out = tmp_path / "out"
    archive = tmp_path / "b.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((documents / "b").rglob("*")):
            z.write(path, path.relative_to(documents).as_posix())
    results = ray_parse([f"file://{documents / 'a'}", f"zip://b::file://{archive}"], out, tiny_checkpoint, tiny_layout_checkpoint)
    assert files(out) == expected_files
    as_local = [(r.name, r.num_pages, [e.replace("file://", "") for e in r.errors]) for r in results]
    assert as_local == [(r.name, r.num_pages, r.errors) for r in single]
    assert writes == Counter({r.name: 1 for r in single if r.markdown_path is not None})
    [broken] = [r for r in results if r.name == "broken"]
    assert broken.markdown_path is None and "not a valid PDF" in broken.errors[0]
    assert broken.errors[0].startswith("file://")  # named as given, not by a temporary copy

    submitted = []
    from_items = ray.data.from_items

    def recorded(items, **kwargs):
        submitted.extend(item["source"] for item in items)
        return from_items(items, **kwargs)

    monkeypatch.setattr(ray.data, "from_items", recorded)
    again = ray_parse([documents / "a", documents / "b"], out, tiny_checkpoint, tiny_layout_checkpoint)
    assert submitted == [str(documents / "a" / "broken.pdf")]  # only the document not written is tried again
    assert [r.markdown_path for r in again] == [r.markdown_path for r in results] and files(out) == expected_files


def _actor_pids() -> list[int]:
    """Processes of recognition actors (Ray titles its workers by the actor they run)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(ACTOR_TITLE):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor's process through /proc")
def test_a_killed_actor_is_restarted_and_every_document_written_once(cluster, tiny_checkpoint, tiny_layout_checkpoint,
                                                                     documents, expected, tmp_path, writes):
    _, expected_files = expected
    out = tmp_path / "out"
    killed = []

    def kill_when_the_first_page_is_back():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if any(out.glob("*/.pages/page-*.json")) and (pids := _actor_pids()):
                os.kill(pids[0], signal.SIGKILL)  # as a crash would: no clean-up runs
                killed.append((pids[0], len(list(out.glob("*/*.md")))))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_the_first_page_is_back, daemon=True)
    killer.start()
    # one layout batch at a time: the job is still running when the first page is back
    results = ray_parse([documents / "a", documents / "b"], out, tiny_checkpoint, tiny_layout_checkpoint, batches_per_actor=1)
    killer.join(timeout=5)
    assert killed, "the actor was never seen, or the job ended first"
    (pid, written_before), = killed
    assert written_before < 19 and pid not in _actor_pids()
    assert files(out) == expected_files
    assert writes == Counter({r.name: 1 for r in results if r.markdown_path is not None}) and len(writes) == 19


def test_cli_parse_on_the_cluster(cluster, tiny_checkpoint, tiny_layout_checkpoint, documents, expected, tmp_path):
    """`glmrt parse --ray ADDRESS` from another process joins the cluster; exit 1 for the corrupt PDF."""
    _, expected_files = expected
    out = tmp_path / "out"
    inputs = [documents / "a" / "doc00.pdf", documents / "a" / "broken.pdf", documents / "b" / "scans" / "scan.png"]
    command = glmrt_command("parse", *map(str, inputs), "-o", str(out), "--ray", cluster,
                            "--model", str(tiny_checkpoint), "--layout-model", str(tiny_layout_checkpoint), "--device", "cpu",
                            "--max-tokens", str(MAX_TOKENS), "--max-num-seqs", "16", "--ray-actors", "1")
    # From the repository root, as a user in a checkout would: Ray puts a driver's working directory
    # on its workers' sys.path unless glmrt.ray.init gives the job a working_dir, and the root's
    # kernels/ would then shadow the Hub's `kernels` in the actors that load the layout model.
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1, done.stderr
    assert "broken.pdf: not a valid PDF" in done.stderr and "doc00.pdf: 1 page ->" in done.stderr
    assert files(out) == {k: v for k, v in expected_files.items() if k.split("/")[0] in ("doc00", "scan")}
    bad = subprocess.run([*command[:-2], "--ray-actors", "0"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "actors must be an int >= 1" in bad.stderr


def _same(response: httpx.Response) -> tuple:
    """A response without what differs between two servers (ids, timestamps, how a stream's text
    is cut into chunks)."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        # The text deltas are joined: steps a reader has not taken yet are folded into one chunk,
        # so how the text is cut into chunks depends on timing. Every other event is kept.
        text, kept = [], []
        for event in events:
            event = {k: v for k, v in event.items() if k not in ("id", "created")}
            choices = event.get("choices") or []
            for choice in choices:
                text.append(choice["delta"].pop("content", None) or "")
            if not choices or any(c["delta"] or c.get("finish_reason") for c in choices):
                kept.append(event)
        body = {"text": "".join(text), "events": kept}
    else:
        body = response.json()
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k not in ("id", "created")}
            if "data" in body and isinstance(body["data"], list):  # /v1/models
                body["data"] = [{k: v for k, v in m.items() if k != "created"} for m in body["data"]]
    return response.status_code, body


def test_serve_on_ray_answers_as_glmrt_serve(cluster, tiny_checkpoint, tiny_layout_checkpoint, documents):
    page = base64.b64encode((documents / "b" / "scans" / "scan.png").read_bytes()).decode()
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{page}"}}
    chat = {"model": "glm-ocr", "max_tokens": 8,
            "messages": [{"role": "user", "content": [image, {"type": "text", "text": "Text Recognition:"}]}]}
    requests = [
        ("post", "/v1/chat/completions", chat),
        ("post", "/v1/chat/completions", {**chat, "stream": True}),
        ("post", "/v1/chat/completions", {**chat, "temperature": 0.8, "seed": 7}),
        ("post", "/v1/completions", {"model": "glm-ocr", "prompt": "Hello", "max_tokens": 5}),
        ("post", "/v1/chat/completions", {**chat, "max_tokens": -1}),  # 400, naming the field
        ("post", "/v1/chat/completions", {**chat, "model": "other"}),  # 404
        ("post", "/glmocr/parse", {"images": [f"data:image/png;base64,{page}"]}),
        ("get", "/v1/models", None),
    ]
    args = ("--layout-model", str(tiny_layout_checkpoint), "--max-model-len", "2048", "--max-num-seqs", "4")
    answers = {}
    for name, extra in (("plain", ()), ("ray", ("--ray", cluster))):
        # From the repository root: Ray Serve replicas too must not import its kernels/ (see above).
        with ServerProcess(tiny_checkpoint, *args, *extra, startup_timeout_s=240, cwd=REPO) as server:
            answers[name] = [_same(httpx.request(method, server.url + path, json=body, timeout=120))
                             for method, path, body in requests]
            if name == "ray":
                from ray import serve

                status = serve.status().applications["glmrt"]
                config = status.deployments["glmrt"]
                assert status.status == "RUNNING" and config.replica_states.get("RUNNING") == 1
                _disconnect_aborts_the_request(server)
    assert [status for status, _ in answers["ray"]] == [200, 200, 200, 200, 400, 404, 200, 200]
    assert answers["ray"] == answers["plain"]



def test_serve_deployment_is_sized_by_the_cluster():
    from glmrt.ray.serving import deployment_options
    from glmrt.server.app import ServerConfig

    config = ServerConfig(served_model_names=("glm-ocr",), max_queue=100)
    cpu = deployment_options(config, gpus=0)
    assert cpu["ray_actor_options"] == {"num_gpus": 0} and cpu["max_ongoing_requests"] == 132
    assert cpu["graceful_shutdown_timeout_s"] == 30  # --shutdown-timeout
    assert cpu["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1,
                                         "target_ongoing_requests": 32}
    gpus = deployment_options(config, gpus=8, max_num_seqs=64, min_replicas=0)
    assert gpus["ray_actor_options"] == {"num_gpus": 1}
    assert gpus["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 8,
                                          "target_ongoing_requests": 64}
    with pytest.raises(ValueError, match="max_replicas"):
        deployment_options(config, gpus=2, min_replicas=3)
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        deployment_options(config, gpus=2, target_ongoing_requests=-1)


def _disconnect_aborts_the_request(server: ServerProcess) -> None:
    """A client that goes away mid-request: Ray Serve's proxy cancels it in the replica, whose
    app aborts the engine request (or never starts it, if the cancel comes first): a few seconds
    later nothing runs, long before the request would have ended by itself (~6 s here)."""
    def running() -> float:
        return server.metrics()["glmrt:num_requests_running"]

    body = {"model": "glm-ocr", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2000,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30.0, read=1.0))
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not running():  # give a late admission the time to show
        time.sleep(0.05)
    time.sleep(1.0)
    assert running() == 0, "the request of a client that went away is still running"

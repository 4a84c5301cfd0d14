"""GPU-only end-to-end checks at GLM-OCR's real size (random bf16 weights): CUDA-graph decode with
overlapped steps vs eager serial decode (every step replays the forward and the sampling under the
token masks as two graphs; with structured-output rows and with MTP speculation too), and speculative vs
plain decode, compared bitwise: every token's raw bf16 logits with torch.equal (the batch-invariant
kernels promise the same bits whatever the batch, bucket or step kind), and logits close to
transformers' bf16 forward. Skipped without a GPU.

The checkpoint: the directory named by the environment variable GLMRT_GPU_MODEL when it is set
(benchmarks/gpu_suite.sh sets it to the real-size random checkpoint it built for every step, with
benchmarks/random_checkpoint.py), else one written here from the GPU's RNG (random_weights.write_glm_ocr,
seconds). It must carry the MTP layer (the speculative tests draft with it).
"""
import dataclasses
import os
from pathlib import Path

import pytest
import torch

import glmrt
from glmrt.engine.runner import allocate_kv_cache
from glmrt.model.positions import mrope_positions
from glmrt.model.text import AttentionMetadata
from glmrt_testing.engine_checks import LogitsRecorder, logits_differences
from glmrt_testing.helpers import make_image
from glmrt_testing.random_weights import write_glm_ocr

pytestmark = pytest.mark.gpu

REQUESTS = [
    {"images": [make_image(640, 480, 0)], "prompt": "Text Recognition:"},
    {"images": [make_image(300, 900, 1), make_image(500, 120, 2)], "prompt": "Table Recognition:"},
    {"images": [], "prompt": "plain text prompt"},
    {"images": [make_image(1200, 1600, 3)], "prompt": "Formula Recognition:"},
    {"images": [make_image(90, 60, 4)], "prompt": "Text Recognition:"},
]


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    if os.environ.get("GLMRT_GPU_MODEL"):
        return Path(os.environ["GLMRT_GPU_MODEL"])
    return write_glm_ocr(tmp_path_factory.mktemp("glm-ocr-real-random"), device="cuda", dtype=torch.bfloat16)


PARAMS = [  # greedy, penalised, and seeded sampled rows in the same batches
    glmrt.SamplingParams(max_tokens=48, ignore_eos=True),
    glmrt.SamplingParams(max_tokens=48, ignore_eos=True, repetition_penalty=1.1),
    glmrt.SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8, top_p=0.9, seed=1),
    glmrt.SamplingParams(max_tokens=48, ignore_eos=True),
    glmrt.SamplingParams(max_tokens=33, ignore_eos=True, temperature=1.0, top_k=20, seed=2, repetition_penalty=1.1),
]


def recorded(llm, params) -> list:
    """(output, raw logits of each of its tokens) per request (log-probabilities asked for, so
    every step passes its logits through the recorded seam)."""
    recorder = LogitsRecorder(llm.engine)
    return recorder.generate(REQUESTS, [dataclasses.replace(p, logprobs=1) for p in params])


def assert_bitwise_equal(results, reference, what: str) -> None:
    for i, (got, want) in enumerate(zip(results, reference, strict=True)):
        found = logits_differences(got, want)
        assert not found, f"{what}, request {i}: " + "; ".join(found[:4])


def test_graph_decode_matches_eager_and_serial(real_checkpoint):
    """CUDA-graph decode (sampling inside the graph, overlapped steps) gives the tokens of eager,
    serial decode: graph and eager share the bucket size, block-table width and split-KV choice."""
    graphs = glmrt.LLM(str(real_checkpoint), max_num_seqs=8, max_model_len=8192, gpu_memory_utilization=0.4)
    assert graphs.engine.backend == "triton" and graphs.engine.runner.graphs is not None
    engine = graphs.engine
    assert engine.runner.graph_memory_bytes > 0  # the pool and static outputs, at least
    # The KV budget left room for them: a trial runner's graphs (the same captures) were measured
    # before the cache was sized (within one 2 MiB allocator segment).
    assert engine.runner_memory_bytes >= engine.runner.graph_memory_bytes - 2**21
    with_graphs = recorded(graphs, PARAMS)
    del graphs
    torch.cuda.empty_cache()
    eager = glmrt.LLM(str(real_checkpoint), max_num_seqs=8, max_model_len=8192, kv_cache_tokens=65536,
                      enforce_eager=True, async_scheduling=False)
    assert eager.engine.runner.graphs is None
    assert_bitwise_equal(recorded(eager, PARAMS), with_graphs, "eager serial vs graphs")


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "lines"], "properties": {
    "name": {"type": "string", "maxLength": 12},
    "lines": {"type": "array", "maxItems": 4, "items": {"type": "object", "required": ["qty"], "additionalProperties": False,
                                                         "properties": {"qty": {"type": "integer", "minimum": 0, "maximum": 99}}}},
}}
CONSTRAINED = [  # constrained rows beside unconstrained ones, greedy and sampled
    glmrt.SamplingParams(max_tokens=200, json_schema=SCHEMA),
    glmrt.SamplingParams(max_tokens=48, ignore_eos=True, repetition_penalty=1.1),
    glmrt.SamplingParams(max_tokens=200, json_schema=SCHEMA, temperature=0.8, top_p=0.9, seed=1),
    glmrt.SamplingParams(max_tokens=200, regex=r"[A-Z]{2}-[0-9]{2,6}"),
    glmrt.SamplingParams(max_tokens=200, choice=["paid", "due"], temperature=1.0, seed=2),
]


def test_graph_decode_with_structured_outputs_matches_eager_and_serial(real_checkpoint):
    """The two graphs of a step (the forward, then the sampling under the masks the host made
    meanwhile) under overlapped steps give eager serial decode's tokens, and every constrained
    output is complete and valid."""
    import json
    import re

    import jsonschema

    graphs = glmrt.LLM(str(real_checkpoint), max_num_seqs=8, max_model_len=8192, gpu_memory_utilization=0.4)
    assert ("sample", 8, True) in graphs.engine.runner.graphs.graphs
    with_graphs = recorded(graphs, CONSTRAINED)
    outputs = [out for out, _ in with_graphs]
    del graphs
    torch.cuda.empty_cache()
    for out in (outputs[0], outputs[2]):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{2,6}", outputs[3].text) and outputs[4].text in ("paid", "due")
    eager = glmrt.LLM(str(real_checkpoint), max_num_seqs=8, max_model_len=8192, kv_cache_tokens=65536,
                      enforce_eager=True, async_scheduling=False)
    assert_bitwise_equal(recorded(eager, CONSTRAINED), with_graphs, "eager serial vs graphs")


@pytest.mark.parametrize("params", [PARAMS, CONSTRAINED], ids=["plain", "constrained"])
def test_speculative_graph_decode_matches_eager(real_checkpoint, params):
    """MTP speculation (k = 3): the captured speculative step (catch-up and chained drafts, then
    multi-query verify and rejection sampling under the masks of the verified positions) under
    overlapped steps gives eager serial speculation's tokens, constrained rows speculating too."""
    options = dict(max_num_seqs=8, max_model_len=8192, num_speculative_tokens=3)
    graphs = glmrt.LLM(str(real_checkpoint), gpu_memory_utilization=0.4, **options)
    assert ("verify", 8, True) in graphs.engine.runner.graphs.graphs
    with_graphs = recorded(graphs, params)
    assert graphs.engine.spec_stats.num_drafts > 0
    del graphs
    torch.cuda.empty_cache()
    eager = glmrt.LLM(str(real_checkpoint), kv_cache_tokens=65536, enforce_eager=True, async_scheduling=False, **options)
    assert_bitwise_equal(recorded(eager, params), with_graphs, "eager serial vs graphs, speculative")


def test_a_request_gets_the_same_logits_alone_in_a_batch_and_chunked(real_checkpoint):
    """Batch invariance in bf16 with CUDA graphs: a page request's every-token logits alone, in a
    batch of 5 requests of mixed images and lengths, and with every prompt prefilled in chunks of
    512 tokens beside the running rows' decode steps, are the same bits."""
    params = [dataclasses.replace(p, logprobs=1) for p in PARAMS]
    options = dict(max_num_seqs=8, max_model_len=8192, gpu_memory_utilization=0.4)
    llm = glmrt.LLM(str(real_checkpoint), **options)
    recorder = LogitsRecorder(llm.engine)
    (alone,) = recorder.generate(REQUESTS[3:4], params[3:4])
    assert_bitwise_equal(recorder.generate(REQUESTS, params)[3:4], [alone], "alone vs in a batch of 5")
    del llm, recorder
    torch.cuda.empty_cache()
    chunked = glmrt.LLM(str(real_checkpoint), max_num_batched_tokens=512, **options)
    assert_bitwise_equal(LogitsRecorder(chunked.engine).generate(REQUESTS, params)[3:4], [alone], "chunks of 512")


def test_speculative_decode_gives_plain_decodes_logits(real_checkpoint):
    """Greedy rows (a penalised one too) with MTP speculation (k = 3, graphs): every accepted
    token's logits, computed in a verify step of k + 1 queries per row, are plain decoding's bits."""
    greedy = [p for p in PARAMS if p.temperature == 0.0]
    requests = REQUESTS[: len(greedy)]
    plain = glmrt.LLM(str(real_checkpoint), max_num_seqs=8, max_model_len=8192, gpu_memory_utilization=0.4)
    reference = LogitsRecorder(plain.engine).generate(requests, [dataclasses.replace(p, logprobs=1) for p in greedy])
    del plain
    torch.cuda.empty_cache()
    spec = glmrt.LLM(str(real_checkpoint), max_num_seqs=8, max_model_len=8192, gpu_memory_utilization=0.4,
                     num_speculative_tokens=3)
    got = LogitsRecorder(spec.engine).generate(requests, [dataclasses.replace(p, logprobs=1) for p in greedy])
    assert spec.engine.spec_stats.num_accepted_tokens > 0
    assert_bitwise_equal(got, reference, "speculative vs plain")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_prefill_logits_close_to_transformers_bf16(real_checkpoint, backend):
    """Our bf16 error against transformers in fp32 is at most about transformers' own bf16 error."""
    from transformers import GlmOcrForConditionalGeneration

    llm = glmrt.LLM(str(real_checkpoint), backend=backend, kv_cache_tokens=16384)
    request = REQUESTS[0]
    processed = llm.processor(**request)
    ids = torch.tensor(processed.input_ids, device="cuda")
    grids = [tuple(g) for g in processed.image_grid_thw.tolist()]
    model = llm.engine.model
    positions, _ = mrope_positions(processed.input_ids, grids, 59280, 2)
    t = len(processed.input_ids)
    attn = AttentionMetadata(slot_mapping=torch.arange(t, device="cuda"),
                             cu_seqlens=torch.tensor([0, t], dtype=torch.int32, device="cuda"), max_seqlen=t)
    with torch.inference_mode():
        embeds = model.encode_images(processed.pixel_values.cuda(), grids)
        hidden = model.forward(ids, positions.cuda(), attn, allocate_kv_cache(model, -(-t // 16), 16), embeds, ids == 59280)
        ours = model.compute_logits(hidden).float()
    del llm
    hf_inputs = dict(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                     mm_token_type_ids=(ids == 59280).int()[None], pixel_values=processed.pixel_values.cuda(),
                     image_grid_thw=processed.image_grid_thw.cuda())
    logits = {}
    for dtype in (torch.bfloat16, torch.float32):
        hf = GlmOcrForConditionalGeneration.from_pretrained(real_checkpoint, dtype=dtype, attn_implementation="sdpa").cuda().eval()
        with torch.inference_mode():
            logits[dtype] = hf(**hf_inputs).logits[0].float()
        del hf
        torch.cuda.empty_cache()
    reference = logits[torch.float32]
    scale = reference.abs().max()
    hf_bf16_error = (logits[torch.bfloat16] - reference).abs().max() / scale
    our_error = (ours - reference).abs().max() / scale
    assert our_error <= 2 * hf_bf16_error + 1e-3, (our_error, hf_bf16_error)
    assert (ours.argmax(-1) == logits[torch.bfloat16].argmax(-1)).float().mean() > 0.9


def test_prefill_and_decode_launch_without_waiting_for_the_device(real_checkpoint):
    """Under CUDA's sync debug mode "error", a prefill step with images (pixel and metadata
    uploads, vision pass, prefill, first token) and a decode step queue their work without a
    single host-device synchronisation, so they overlap the step running before them."""
    llm = glmrt.LLM(str(real_checkpoint), max_num_seqs=8, max_model_len=8192, gpu_memory_utilization=0.4)
    engine = llm.engine
    llm.generate(REQUESTS[1], glmrt.SamplingParams(max_tokens=2))  # first-use caches (rotary tables)
    engine.enqueue(engine.prepare(REQUESTS[0], glmrt.SamplingParams(max_tokens=8, temperature=0.7, seed=3)))
    prefill = engine.scheduler.schedule()
    assert prefill.is_prefill
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        handles = [engine.runner.launch(prefill)]
        decode = engine.scheduler.schedule()
        assert not decode.is_prefill
        handles.append(engine.runner.launch(decode))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(len(h.tokens()) == 1 for h in handles)


def test_layout_post_processing_on_the_device_equals_it_on_the_host(tmp_path):
    """PP-DocLayoutV3 on the GPU: post-processing the model's outputs where they are (the device)
    gives exactly what it gives on copies moved to the CPU."""
    import numpy as np

    from glmrt.documents.layout import LayoutDetector
    from glmrt_testing.tiny_layout import build_tiny_layout_checkpoint, synthetic_page

    detector = LayoutDetector.from_pretrained(build_tiny_layout_checkpoint(tmp_path / "layout"), device="cuda")
    rng = np.random.default_rng(0)
    pages = [synthetic_page(rng, 1240, 1754), synthetic_page(rng, 1754, 1240), synthetic_page(rng, 300, 2000)]
    outputs, sizes = detector._forward(pages)
    on_host = type(outputs)(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in outputs.items()})
    for ours, ref in zip(detector._raw(outputs, sizes), detector._raw(on_host, sizes.cpu()), strict=True):
        assert len(ours.scores) > 0
        for field in ("scores", "labels", "boxes", "order"):
            np.testing.assert_array_equal(getattr(ours, field), getattr(ref, field))
        for p, q in zip(ours.polygons, ref.polygons, strict=True):
            assert (p is None and q is None) or np.array_equal(p, q)


def test_parse_on_the_gpu_writes_every_document(real_checkpoint, tmp_path):
    """glmrt parse end to end on the GPU (real-size GLM-OCR, tiny layout): every page of every
    document recorded, no errors, and the same files from a second, resumed run."""
    pytest.importorskip("pypdfium2", reason="glmrt[documents] is not installed (fetch_wheels.sh carries it)")
    from glmrt.documents.layout import LayoutDetector
    from glmrt.documents.pipeline import DocumentParser
    from glmrt_testing.documents import make_pdf
    from glmrt_testing.tiny_layout import build_tiny_layout_checkpoint

    llm = glmrt.LLM(str(real_checkpoint), max_num_seqs=32)
    parser = DocumentParser(llm, LayoutDetector.from_pretrained(build_tiny_layout_checkpoint(tmp_path / "layout")),
                            max_tokens=16)
    pdfs = [make_pdf(tmp_path / "in" / f"doc{i}.pdf", pages=3, seed=i) for i in range(3)]
    results = parser.parse(pdfs, tmp_path / "out")
    assert [r.errors for r in results] == [[], [], []] and [r.num_pages for r in results] == [3, 3, 3]
    written = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    again = parser.parse(pdfs, tmp_path / "out")
    assert [r.markdown_path for r in again] == [r.markdown_path for r in results]
    assert {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()} == written

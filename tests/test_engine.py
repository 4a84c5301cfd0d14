"""The engine: continuous batching, preemption, abort, seeds, streaming — and token-exact output.

Greedy tokens of the triton backend (Triton interpreter on CPU), the torch backend and
transformers' generate must be identical for requests submitted together, staggered, and under
a KV budget small enough to force queueing and preemption.
"""
import asyncio
import dataclasses

import pytest
import torch

import glmrt
from glmrt.engine.async_engine import AsyncEngine, RequestFailed
from glmrt.engine.engine import LLMEngine
from glmrt.engine.runner import kv_bytes_per_token
from glmrt_testing.engine_checks import assert_all_free, run_until_done
from glmrt_testing.helpers import IMAGES, hf_greedy, make_image

EXTRA = {"tall": make_image(70, 190, 3), "tiny": make_image(30, 20, 4)}
ALL_IMAGES = {**IMAGES, **EXTRA}
REQUESTS = [  # six requests, different images and prompt lengths
    (["small"], "Text Recognition:"),
    ([], "a text-only prompt"),
    (["page"], "Table Recognition:"),
    (["wide", "tall"], "Formula Recognition:"),
    (["tiny"], "请按下列JSON格式输出图中信息:\n{\"name\": \"\", \"date\": \"\"}"),
    (["tall"], "Text Recognition: " + "long prompt " * 12),
]
MAX_TOKENS = 24


def as_request(case):
    names, prompt = case
    return {"images": [ALL_IMAGES[n] for n in names], "prompt": prompt}


@pytest.fixture(scope="module")
def expected(hf_model, hf_processor):
    """transformers' greedy tokens for every request, one at a time."""
    return [
        hf_greedy(hf_model, hf_processor, [ALL_IMAGES[n] for n in names], prompt, MAX_TOKENS)[1]
        for names, prompt in REQUESTS
    ]


def make_engine(path, backend, **options):
    return LLMEngine(str(path), device="cpu", dtype="float32", backend=backend, **options)


def run_to_completion(engine, submit_at):
    """submit_at: {step index: [request index, ...]}; returns tokens per request index."""
    params = glmrt.SamplingParams(max_tokens=MAX_TOKENS)
    ids, done, step = {}, {}, 0
    while len(done) < len(REQUESTS):
        for i in submit_at.get(step, []):
            ids[engine.add_request(as_request(REQUESTS[i]), params)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out.token_ids
        step += 1
        assert step < 10_000
    return [done[i] for i in range(len(REQUESTS))]


# Serial and overlapped steps are compared token for token on the torch backend (below); the
# Triton interpreter is slow, so the triton backend runs staggered arrival in
# test_chunked_prefill_in_mixed_steps_matches_transformers, all six at once in
# test_small_kv_budget_queues_and_preempts.
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_together_and_staggered_match_transformers(tiny_checkpoint, expected, async_scheduling):
    backend = "torch"
    engine = make_engine(tiny_checkpoint, backend, async_scheduling=async_scheduling)
    assert run_to_completion(engine, {0: list(range(6))}) == expected
    staggered = run_to_completion(engine, {0: [0], 3: [1, 2], 5: [3], 9: [4, 5]})
    assert staggered == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# The triton backend runs preemption in test_chunked_prefill_in_mixed_steps_matches_transformers.
@pytest.mark.parametrize("backend", ["torch"])
def test_small_kv_budget_queues_and_preempts(tiny_checkpoint, expected, backend):
    engine = make_engine(tiny_checkpoint, backend, kv_cache_tokens=256, max_model_len=256, max_num_seqs=6)
    assert run_to_completion(engine, {0: list(range(6))}) == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def break_vision_of_tall_image(engine, monkeypatch):
    """Make every vision pass that holds the "tall" image (REQUESTS[5]) raise."""
    encode = engine.model.encode_images
    h, w = engine.processor.image_processor.resized_size(ALL_IMAGES["tall"].height, ALL_IMAGES["tall"].width)

    def broken(pixels, grids):
        if (1, h // 14, w // 14) in grids:
            raise RuntimeError("injected vision fault")
        return encode(pixels, grids)

    monkeypatch.setattr(engine.model, "encode_images", broken)


def record_steps(engine):
    """Wrap the runner's step launches -> the list of (decode rows, [(start, end, samples, tokens
    of its images not yet encoded)] per chunk) they are appended to."""
    runner, steps = engine.runner, []
    launch = runner.launch

    def recording_launch(step, *args, **kwargs):
        steps.append((len(step.decode), [(c.start, c.end, c.samples, c.seq.num_unencoded_patches)
                                         for c in step.chunks]))
        return launch(step, *args, **kwargs)

    runner.launch = recording_launch
    return steps


BUDGET = 40  # tokens per step: every prompt but one takes more than one chunk, images are cut across chunks


@pytest.mark.parametrize("backend,async_scheduling", [("torch", True), ("torch", False), ("triton", True)])
def test_chunked_prefill_in_mixed_steps_matches_transformers(tiny_checkpoint, expected, backend, async_scheduling):
    """Staggered arrivals with a 40-token step budget and a 256-token KV cache: prompts (and
    their image slots) are cut into chunks that attend to their cached prefix and run in the same
    steps as the running sequences' decode tokens, and a running request is preempted and
    recomputed. Every request still gives transformers' tokens."""
    engine = make_engine(tiny_checkpoint, backend, async_scheduling=async_scheduling, max_num_batched_tokens=BUDGET,
                         kv_cache_tokens=256, max_model_len=256, max_num_seqs=6)
    steps = record_steps(engine)
    assert run_to_completion(engine, {0: [0], 3: [1, 2], 5: [3], 9: [4, 5]}) == expected
    assert engine.scheduler.num_preemptions > 0
    mixed = [chunks for decode, chunks in steps if decode and chunks]
    assert mixed and any(start > 0 for chunks in mixed for start, *_ in chunks)
    assert any(not samples for _, chunks in steps for _, _, samples, _ in chunks)
    for decode, chunks in steps:  # the budget covers decode tokens, chunk tokens and later chunks' patches
        assert decode + sum(end - start for start, end, *_ in chunks) <= max(BUDGET, decode + 1)
        assert decode + sum(end - start + patches for start, end, _, patches in chunks[1:]) + (
            chunks[0][1] - chunks[0][0] if chunks else 0) <= max(BUDGET, decode + 1)
    assert_all_free(engine)


def test_chunked_prefill_with_preemption_and_sampling_equals_serial_and_unchunked(tiny_checkpoint, expected):
    """Under a KV budget that forces preemption (of prefilling and of running sequences), with
    sampled, seeded and penalised requests: chunked mixed steps, overlapped or serial, give the
    tokens of whole-prompt prefill steps."""
    cases = [
        glmrt.SamplingParams(max_tokens=30, temperature=0.9, top_p=0.8, seed=3, ignore_eos=True),
        glmrt.SamplingParams(max_tokens=35, repetition_penalty=1.3, ignore_eos=True),
        glmrt.SamplingParams(max_tokens=40, temperature=1.2, top_k=20, seed=4, repetition_penalty=1.1, ignore_eos=True),
        glmrt.SamplingParams(max_tokens=MAX_TOKENS),
        glmrt.SamplingParams(max_tokens=1),
        glmrt.SamplingParams(max_tokens=MAX_TOKENS),
    ]
    results = []
    for options in (dict(enable_chunked_prefill=False), dict(max_num_batched_tokens=BUDGET),
                    dict(max_num_batched_tokens=BUDGET, async_scheduling=False)):
        engine = make_engine(tiny_checkpoint, "torch", kv_cache_tokens=256, max_model_len=256, max_num_seqs=6,
                             **options)
        outs = engine.generate([as_request(c) for c in REQUESTS], cases)
        results.append([(o.token_ids, o.finish_reason) for o in outs])
        assert engine.scheduler.num_preemptions > 0
        assert_all_free(engine)
    assert results[0] == results[1] == results[2]
    assert [results[0][i][0] for i in (3, 5)] == [expected[3], expected[5]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_row_admitted_after_chunks_sees_its_whole_prompt(tiny_checkpoint, backend):
    """A 45-token prompt prefilled in 16-token chunks takes a row that another request used
    before it: at its admission the row's presence mask (what the repetition penalty reads) is
    every id of the prompt, the earlier chunks' ids (sent with the admission) and the last
    chunk's (from the step's own upload), plus the token it sampled, and nothing the row held
    before; its block table is the sequence's, zeros after it."""
    engine = make_engine(tiny_checkpoint, backend, max_num_batched_tokens=16, async_scheduling=False)
    engine.generate([{"prompt_token_ids": list(range(400, 430))}], [glmrt.SamplingParams(max_tokens=3)])
    prompt = [300 + (i * 7) % 97 for i in range(45)]
    engine.add_request({"prompt_token_ids": prompt}, glmrt.SamplingParams(max_tokens=8, repetition_penalty=1.2))
    while not engine.scheduler.running:
        engine.step()
    [seq] = engine.scheduler.running
    batch = engine.runner.batch
    assert set(batch.sampling.presence[seq.row].nonzero()[:, 0].tolist()) == set(prompt) | set(seq.output_token_ids)
    table = batch.block_tables[seq.row].tolist()
    assert table[: len(seq.block_table)] == seq.block_table and not any(table[len(seq.block_table):])
    assert batch.context_lens[seq.row] == len(prompt) and batch.active[seq.row]


def test_a_prefilling_request_preempted_for_a_decode_block_is_recomputed(tiny_checkpoint):
    """A 16-block cache: a (31 tokens, 2 blocks) decodes while b (224 tokens, the other 14
    blocks) is prefilled in chunks. a's token at index 32 needs a third block: b is preempted
    there without waiting for a's in-flight token, and is recomputed once a has finished. Both
    give the tokens of an engine with room for everything."""
    prompts = [list(range(300, 331)), [300 + i % 64 for i in range(224)]]
    params = [glmrt.SamplingParams(max_tokens=8, ignore_eos=True), glmrt.SamplingParams(max_tokens=32, ignore_eos=True)]
    results = []
    for kv in (256, 1024):
        engine = make_engine(tiny_checkpoint, "torch", kv_cache_tokens=kv, max_model_len=256, max_num_batched_tokens=BUDGET)
        preempted = []
        preempt = engine.scheduler._preempt
        engine.scheduler._preempt = lambda seq: preempted.append((seq.request_id, seq.status.value)) or preempt(seq)
        outs = engine.generate([{"prompt_token_ids": p} for p in prompts], params)
        results.append([o.token_ids for o in outs])
        assert preempted == ([(outs[1].request_id, "prefilling")] if kv == 256 else [])
        assert_all_free(engine)
    assert results[0] == results[1]


def test_a_vision_fault_in_a_mixed_step_leaves_the_decode_rows_alone(tiny_checkpoint, expected, monkeypatch):
    """A request whose vision pass fails in a mixed step fails alone; the step's decode rows run
    on (as a decode step) and, like the requests prefilled after it, give transformers' tokens."""
    engine = make_engine(tiny_checkpoint, "torch", max_num_batched_tokens=BUDGET)
    params = glmrt.SamplingParams(max_tokens=MAX_TOKENS)
    running = [engine.add_request(as_request(REQUESTS[i]), params) for i in (1, 0)]
    engine.step()
    engine.step()
    break_vision_of_tall_image(engine, monkeypatch)
    steps = record_steps(engine)
    bad = engine.add_request(as_request(REQUESTS[5]), params)
    later = engine.add_request(as_request(REQUESTS[4]), params)
    done = run_until_done(engine)
    assert steps[0][0] == 2 and steps[0][1][0][:2] == (0, BUDGET - 2)  # the failing mixed step
    assert steps[1] == (2, [])  # its decode rows, alone
    assert done[bad].finish_reason == "error" and "injected vision fault" in done[bad].error
    assert [done[i].token_ids for i in running] == [expected[1], expected[0]]
    assert done[later].token_ids == expected[4]
    assert_all_free(engine)


def test_prompt_that_cannot_fit_is_rejected(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, "torch", kv_cache_tokens=64, max_model_len=64)
    with pytest.raises(ValueError, match="leaves no room to generate within max_model_len"):
        engine.add_request(as_request(REQUESTS[2]))
    assert not engine.has_unfinished()


def test_kv_cache_smaller_than_max_model_len_is_refused_at_start(tiny_checkpoint):
    with pytest.raises(ValueError, match="kv_cache_tokens=256 cannot hold one request of max_model_len=4096"):
        make_engine(tiny_checkpoint, "torch", kv_cache_tokens=256)


def test_the_gpu_kv_budget_leaves_room_for_what_the_runner_keeps(tiny_checkpoint, monkeypatch):
    """The GPU's KV budget, worked out on a CPU under a stand-in of CUDA's memory accounting: a
    trial runner (over a one-block cache, made and released) is measured, and what it keeps beside
    its cache (on a GPU its graphs' pool and static outputs, its batch state) is taken off the
    memory the cache may use, with the weights and the worst step's peak."""
    engine = make_engine(tiny_checkpoint, "torch", max_model_len=256)
    per_token, block = kv_bytes_per_token(engine.model), engine.options.block_size
    kept, peak, other, total = 3000 * per_token, 2000 * per_token, 1000 * per_token, 20_000 * per_token
    reserved = [5000 * per_token]  # the weights and whatever the allocator holds
    make_runner = engine._make_runner

    def measured_runner(num_blocks):
        assert num_blocks == 1
        reserved[0] += kept + num_blocks * block * per_token
        return make_runner(num_blocks)

    for name, fake in dict(synchronize=lambda device=None: None, empty_cache=lambda: None,
                           memory_reserved=lambda device=None: reserved[0],
                           mem_get_info=lambda device=None: (total - other - reserved[0], total)).items():
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(engine, "_make_runner", measured_runner)
    monkeypatch.setattr(engine, "_profile_peak_memory", lambda: peak)
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    monkeypatch.setattr(engine.options, "kv_cache_tokens", None)
    tokens = engine._kv_cache_tokens()
    assert engine.runner_memory_bytes == kept
    budget = (total - other - peak - kept) * engine.options.gpu_memory_utilization
    assert tokens == int(budget) // per_token
    kept = total  # a runner that keeps more than there is leaves no KV cache: refused, naming the option
    with pytest.raises(ValueError, match="KV-cache tokens fit in GPU memory at gpu_memory_utilization"):
        engine._kv_cache_tokens()


def test_triton_backend_on_cpu_needs_the_interpreter(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'triton' needs a CUDA device"):
        make_engine(tiny_checkpoint, "triton")


def test_unknown_engine_option_is_named(tiny_checkpoint):
    with pytest.raises(ValueError, match="max_num_seq"):
        make_engine(tiny_checkpoint, "torch", max_num_seq=4)
    with pytest.raises(ValueError, match="max_num_seqs must be an int >= 1, got 0"):
        make_engine(tiny_checkpoint, "torch", max_num_seqs=0)


def test_abort_in_every_state_frees_everything(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, "torch", max_num_seqs=3)
    params = glmrt.SamplingParams(max_tokens=50)
    ids = [engine.add_request(as_request(c), params) for c in REQUESTS]
    last = engine.add_request(as_request(REQUESTS[0]), glmrt.SamplingParams(max_tokens=2))
    engine.step()  # prefill of three requests, in flight
    engine.step()  # their first decode launched, the prefill's tokens read
    engine.step()
    states = {s.request_id: s.status.value for s in (r.seq for r in engine._requests.values())}
    assert set(states.values()) >= {"waiting", "running"}
    assert engine._in_flight is not None
    for request_id in [ids[4], ids[0], last]:  # waiting, running with a token in flight, waiting
        out = engine.abort(request_id)
        assert out.finish_reason == "abort" and out.finished
    assert engine.abort(ids[0]) is None  # already done
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id not in (ids[4], ids[0], last)
            if out.request_id == ids[1] and len(out.token_ids) == 3:
                for request_id in ids:
                    engine.abort(request_id)
    assert_all_free(engine)


def test_every_output_has_every_field(tiny_checkpoint):
    """The engine makes its outputs without RequestOutput.__init__ (RequestOutput.made): each one,
    streamed, final only, stopped by a string, at the length limit or aborted, has every field, and
    equals the output __init__ makes of the same values."""
    engine = make_engine(tiny_checkpoint, "torch")
    text = engine.generate([as_request(REQUESTS[2])], [glmrt.SamplingParams(max_tokens=12, ignore_eos=True)])[0].text
    cases = [glmrt.SamplingParams(max_tokens=6, ignore_eos=True),
             glmrt.SamplingParams(max_tokens=6, ignore_eos=True, output_kind="final_only"),
             glmrt.SamplingParams(max_tokens=30, ignore_eos=True, stop=[text[len(text) // 2:][:2]]),
             glmrt.SamplingParams(max_tokens=50, ignore_eos=True)]
    ids = [engine.add_request(as_request(REQUESTS[i]), params) for i, params in enumerate(cases)]
    outputs = engine.step() + engine.step() + engine.step()
    outputs.append(engine.abort(ids[3]))
    outputs += run_until_done(engine).values()
    names = [f.name for f in dataclasses.fields(glmrt.RequestOutput)]
    for out in outputs:
        values = {name: getattr(out, name) for name in names}
        assert out == glmrt.RequestOutput(**values)
    reasons = {o.finish_reason for o in outputs}
    assert {None, "length", "abort"} <= reasons and any(o.stop_reason for o in outputs)


def test_streamed_outputs_read_later_hold_their_own_step(tiny_checkpoint):
    """An output refers to its request's growing token and text lists (outputs.Prefix) instead of
    copying them: read only after the request ended, each still has the tokens and text of the
    step that made it, with and without stop strings, and a value read once is the one kept."""
    engine = make_engine(tiny_checkpoint, "torch")
    text = engine.generate([as_request(REQUESTS[2])], [glmrt.SamplingParams(max_tokens=12, ignore_eos=True)])[0].text
    stop = next(text[-n:] for n in range(1, len(text)) if text[-n:] not in text[:-1])  # first seen at its end
    cases = [glmrt.SamplingParams(max_tokens=12, ignore_eos=True),
             glmrt.SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop])]
    reasons = []
    for params in cases:
        engine.add_request(as_request(REQUESTS[2]), params)
        streamed = []
        while engine.has_unfinished():
            streamed += engine.step()
        tokens, deltas = [], []
        for out in streamed:
            tokens += out.delta_token_ids
            deltas.append(out.delta_text)
        last = streamed[-1]
        assert last.finished and len(streamed) > 3 and last.text == "".join(deltas)
        stop = last.token_ids[-1:] if last.finish_reason == "stop" and len(tokens) < len(last.token_ids) else []
        assert tokens + stop == last.token_ids
        for i, out in enumerate(streamed[:-1]):
            assert out.token_ids == last.token_ids[: i + 1] and out.text == "".join(deltas[: i + 1])
        first = streamed[0]
        first.token_ids.append(-1)
        assert first.token_ids == [last.token_ids[0], -1] and last.token_ids[-1] != -1
        reasons.append(last.finish_reason)
    assert reasons == ["length", "stop"]


def test_abort_of_a_draining_request(tiny_checkpoint):
    """A request whose last token is scheduled but not read back yet (no row, still holds blocks)."""
    engine = make_engine(tiny_checkpoint, "torch")
    request_id = engine.add_request(as_request(REQUESTS[1]), glmrt.SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()  # prefill: token 1 in flight
    engine.step()  # decode of token 2 launched, token 1 read back
    assert engine.scheduler.schedule() is None  # nothing left to schedule: the request gives up its row
    seq = engine._requests[request_id].seq
    assert seq.status.value == "draining" and seq.row is None and seq.block_table
    assert engine.abort(request_id).finish_reason == "abort"
    assert engine.step() == []  # the in-flight token is dropped
    assert_all_free(engine)


def test_eos_as_the_max_tokens_th_token_finishes_with_length(tiny_checkpoint, expected):
    tokens = expected[0]
    stop = tokens[4]
    k = tokens.index(stop)
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")
    req = as_request(REQUESTS[0])
    at_limit = llm.generate(req, glmrt.SamplingParams(max_tokens=k + 1, stop_token_ids=[stop]))[0]
    assert at_limit.finish_reason == "length" and at_limit.token_ids == tokens[: k + 1]
    before_limit = llm.generate(req, glmrt.SamplingParams(max_tokens=k + 2, stop_token_ids=[stop]))[0]
    assert before_limit.finish_reason == "stop" and before_limit.token_ids == tokens[: k + 1]


def test_a_failing_prefill_step_fails_only_its_requests(tiny_checkpoint, expected, monkeypatch):
    engine = make_engine(tiny_checkpoint, "torch", max_num_seqs=2)
    params = glmrt.SamplingParams(max_tokens=MAX_TOKENS)
    first = engine.add_request(as_request(REQUESTS[1]), params)
    engine.step()
    break_vision_of_tall_image(engine, monkeypatch)
    bad = engine.add_request(as_request(REQUESTS[5]), params)
    later = [engine.add_request(as_request(REQUESTS[i]), params) for i in (0, 4)]
    done = run_until_done(engine)
    assert done[bad].finish_reason == "error" and "injected vision fault" in done[bad].error
    assert done[first].token_ids == expected[1]
    assert [done[i].token_ids for i in later] == [expected[0], expected[4]]
    assert_all_free(engine)


def test_a_shared_prefill_that_fails_is_retried_request_by_request(tiny_checkpoint, expected, monkeypatch):
    """Three requests prefilled together, one of which breaks the vision pass: each is prefilled
    again alone, the two good ones give transformers' tokens and only the bad one fails."""
    engine = make_engine(tiny_checkpoint, "torch", max_num_seqs=4)
    params = glmrt.SamplingParams(max_tokens=MAX_TOKENS)
    prefills = []
    launch = engine.runner.launch

    def counting(step, *args, **kwargs):
        if step.chunks:
            prefills.append([s.request_id for s in step.prefill_seqs])
        return launch(step, *args, **kwargs)

    break_vision_of_tall_image(engine, monkeypatch)
    monkeypatch.setattr(engine.runner, "launch", counting)
    good = [engine.add_request(as_request(REQUESTS[i]), params) for i in (0, 2)]
    bad = engine.add_request(as_request(REQUESTS[5]), params)
    done = run_until_done(engine)
    assert prefills == [[*good, bad], [good[0]], [good[1]], [bad]]
    assert done[bad].finish_reason == "error" and "injected vision fault" in done[bad].error
    assert [done[i].token_ids for i in good] == [expected[0], expected[2]]
    assert engine.scheduler.num_preemptions == 0
    assert_all_free(engine)


def test_a_request_whose_detokenization_fails_fails_alone(tiny_checkpoint, expected, monkeypatch):
    engine = make_engine(tiny_checkpoint, "torch", max_num_seqs=4)
    params = glmrt.SamplingParams(max_tokens=MAX_TOKENS)
    ids = [engine.add_request(as_request(REQUESTS[i]), params) for i in range(3)]
    detok = engine._requests[ids[1]].detokenizer
    calls = []

    def broken(token):
        calls.append(1)
        if len(calls) == 3:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "injected")
        return type(detok).add_token(detok, token)

    monkeypatch.setattr(detok, "add_token", broken)
    done = run_until_done(engine)
    assert done[ids[1]].finish_reason == "error" and "injected" in done[ids[1]].error
    assert [done[ids[i]].token_ids for i in (0, 2)] == [expected[0], expected[2]]
    assert_all_free(engine)


def test_a_decode_step_that_fails_once_is_retried_and_nobody_fails(tiny_checkpoint, expected, monkeypatch):
    """A fault no request can be blamed for (here: the third decode launch raises) costs the
    step's requests a recompute in isolation groups, never their output."""
    engine = make_engine(tiny_checkpoint, "torch", max_num_seqs=2)
    params = glmrt.SamplingParams(max_tokens=MAX_TOKENS)
    ids = [engine.add_request(as_request(REQUESTS[i]), params) for i in range(4)]
    launch, calls = engine.runner.launch, []

    def broken(step, *args, **kwargs):
        if not step.chunks:  # a decode step
            calls.append([s.request_id for s in step.seqs])
            if len(calls) == 3:
                raise RuntimeError("injected decode fault")
        return launch(step, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "launch", broken)
    done = run_until_done(engine)
    assert calls[2] == ids[:2]
    assert all(done[i].finish_reason in ("stop", "length") for i in ids)
    assert [done[i].token_ids for i in ids] == expected[:4]
    assert engine.scheduler.running == [] and engine.scheduler.draining == []
    assert_all_free(engine)


def test_interrupted_generate_leaves_nothing_running(tiny_checkpoint, expected, monkeypatch):
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")
    engine = llm.engine
    step, calls = engine.step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([as_request(c) for c in REQUESTS], glmrt.SamplingParams(max_tokens=MAX_TOKENS))
    monkeypatch.setattr(engine, "step", step)
    while engine.has_unfinished():  # only the dropped in-flight step is left
        assert engine.step() == []
    assert_all_free(engine)
    outs = llm.generate([as_request(c) for c in REQUESTS[:3]], glmrt.SamplingParams(max_tokens=MAX_TOKENS))
    assert [o.token_ids for o in outs] == expected[:3]


def test_generate_rejects_bad_request_and_queues_nothing(tiny_checkpoint):
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")
    with pytest.raises(ValueError, match="undecodable|cannot|decode"):
        llm.generate([as_request(REQUESTS[0]), {"images": [b"not an image"], "prompt": "x"}])
    assert not llm.engine.has_unfinished()
    assert llm.generate(as_request(REQUESTS[1]), glmrt.SamplingParams(max_tokens=3))[0].finish_reason


def test_sampling_seeds_reproduce(tiny_checkpoint):
    """(The triton backend's sampler differs only by its penalty and argmax kernels, tested in
    tests/kernels/test_sampling.py, and runs greedy end to end in the other engine tests.)"""
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")
    req = as_request(REQUESTS[0])

    def sample(seed, others=1, **kw):
        params = glmrt.SamplingParams(max_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=seed, **kw)
        requests = [as_request(REQUESTS[i]) for i in range(1, 1 + others)] + [req]
        return llm.generate(requests, [glmrt.SamplingParams(max_tokens=5)] * others + [params])[-1].token_ids

    first = sample(7)
    assert sample(7, others=3) == first  # whatever else is in the batch
    assert sample(8) != first
    assert sample(2**64 - 1) == sample(-1)  # seeds past int64 are their two's-complement bits
    greedy = llm.generate(req, glmrt.SamplingParams(max_tokens=12))[0].token_ids
    top1 = llm.generate(req, glmrt.SamplingParams(max_tokens=12, temperature=1.0, top_k=1, seed=1))[0].token_ids
    assert top1 == greedy


def test_overlapped_engine_equals_serial_engine(tiny_checkpoint):
    """Sampled, seeded, penalised and greedy requests with different lengths, under preemption:
    the overlapped engine gives the serial engine's tokens, token for token."""
    cases = [
        glmrt.SamplingParams(max_tokens=40, temperature=0.9, top_p=0.8, seed=3, ignore_eos=True),
        glmrt.SamplingParams(max_tokens=45, repetition_penalty=1.3, ignore_eos=True),
        glmrt.SamplingParams(max_tokens=60, temperature=1.2, top_k=20, seed=4, repetition_penalty=1.1, ignore_eos=True),
        glmrt.SamplingParams(max_tokens=40, ignore_eos=True),
        glmrt.SamplingParams(max_tokens=1),
        glmrt.SamplingParams(max_tokens=50, temperature=0.7, seed=5, ignore_eos=True),
    ]
    results = []
    for async_scheduling in (True, False):
        engine = make_engine(tiny_checkpoint, "torch", kv_cache_tokens=256, max_model_len=256, max_num_seqs=6,
                             async_scheduling=async_scheduling)
        outs = engine.generate([as_request(c) for c in REQUESTS], cases)
        results.append([(o.token_ids, o.finish_reason, o.text) for o in outs])
        assert engine.scheduler.num_preemptions > 0
        assert_all_free(engine)
    assert results[0] == results[1]
    assert [len(tokens) for tokens, _, _ in results[0]][4] == 1


def test_async_engine_streams_and_aborts(tiny_checkpoint, expected):
    async def main():
        engine = AsyncEngine(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")
        params = glmrt.SamplingParams(max_tokens=MAX_TOKENS)

        async def collect(i):
            text, tokens, last = "", [], None
            async for out in engine.generate(as_request(REQUESTS[i]), params):
                text += out.delta_text
                tokens += out.delta_token_ids
                last = out
            return text, tokens, last

        async def abandon():
            stream = engine.generate(as_request(REQUESTS[2]), glmrt.SamplingParams(max_tokens=1000))
            async for _ in stream:
                break
            await stream.aclose()

        async def bad():
            with pytest.raises(ValueError):
                async for _ in engine.generate({"images": [b"garbage"], "prompt": "x"}):
                    pass

        results = await asyncio.gather(collect(0), collect(3), abandon(), bad(), collect(4))
        for i, (text, tokens, last) in zip([0, 3, 4], [results[0], results[1], results[4]]):
            assert last.finished and last.text == text
            stop = last.token_ids[-1:] if last.finish_reason == "stop" else []
            assert tokens + stop == last.token_ids == expected[i]
        for _ in range(100):  # the abort is applied by the engine loop between steps
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.05)
        bm = engine.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        engine.close()

    asyncio.run(main())


def test_async_abort_races(tiny_checkpoint, monkeypatch):
    """Aborts that arrive while a request's images are decoded, after it was prepared but before
    the engine picked it up, and a consumer cancelled mid-preparation: each ends with a final
    output (or a clean cancellation) and leaves nothing behind."""
    import threading

    async def main():
        engine = AsyncEngine(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")
        prepare, gate = engine.engine.prepare, threading.Event()

        def slow_prepare(*args):
            gate.wait(timeout=30)
            return prepare(*args)

        async def first(stream):
            return await asyncio.wait_for(stream.__anext__(), timeout=60)

        # 1. abort while the images are being decoded
        monkeypatch.setattr(engine.engine, "prepare", slow_prepare)
        task = asyncio.create_task(first(engine.generate(as_request(REQUESTS[0]), request_id="decoding")))
        while "decoding" not in engine._preparing:
            await asyncio.sleep(0.01)
        engine.abort("decoding")
        gate.set()
        out = await task
        assert out.finish_reason == "abort" and out.request_id == "decoding"

        # 2. abort after preparation, while the core thread is still taking the request in: the
        # abort waits in the core's inbox behind it
        monkeypatch.setattr(engine.engine, "prepare", prepare)
        enqueue, entered, release = engine.engine.enqueue, threading.Event(), threading.Event()

        def slow_enqueue(seq):
            entered.set()
            release.wait(timeout=30)
            return enqueue(seq)

        monkeypatch.setattr(engine.engine, "enqueue", slow_enqueue)
        task = asyncio.create_task(first(engine.generate(as_request(REQUESTS[0]), request_id="prepared")))
        assert await asyncio.to_thread(entered.wait, 30)
        assert engine.stats().num_waiting == 1  # in neither the scheduler nor a worker thread: still counted
        engine.abort("prepared")
        release.set()
        out = await task
        assert out.finish_reason == "abort" and out.request_id == "prepared"
        monkeypatch.setattr(engine.engine, "enqueue", enqueue)

        # 3. the consumer is cancelled while its images are being decoded
        gate.clear()
        monkeypatch.setattr(engine.engine, "prepare", slow_prepare)
        task = asyncio.create_task(first(engine.generate(as_request(REQUESTS[0]), request_id="cancelled")))
        while "cancelled" not in engine._preparing:
            await asyncio.sleep(0.01)
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # the worker thread finishes its preparation; nothing may be queued
        for _ in range(100):
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.05)
        assert not engine._streams and not engine._preparing
        stats = engine.stats()
        assert (stats.num_waiting, stats.num_running, stats.kv_cache_usage) == (0, 0, 0.0)
        assert_all_free(engine.engine)

        # 4. a failed step ends its request with RequestFailed; the next request is unaffected
        monkeypatch.setattr(engine.engine, "prepare", prepare)
        launch = engine.engine.runner.launch

        def broken(step, *args, **kwargs):
            if not step.chunks:  # its decode step
                raise RuntimeError("injected")
            return launch(step, *args, **kwargs)

        monkeypatch.setattr(engine.engine.runner, "launch", broken)
        with pytest.raises(RequestFailed, match="injected"):
            async for _ in engine.generate(as_request(REQUESTS[1]), glmrt.SamplingParams(max_tokens=5)):
                pass
        monkeypatch.setattr(engine.engine.runner, "launch", launch)
        outs = [o async for o in engine.generate(as_request(REQUESTS[1]), glmrt.SamplingParams(max_tokens=5))]
        assert outs[-1].finished and outs[-1].finish_reason in ("stop", "length")
        assert_all_free(engine.engine)
        engine.close()

    asyncio.run(main())


def test_worst_step_runs_the_largest_page_prefill_and_sampled_rows(tiny_checkpoint, monkeypatch):
    """The step whose peak memory sizes the KV cache on a GPU runs on any device: the largest page
    through the real pixel path, a full-budget prefill and the sampled path over max_num_seqs rows."""
    engine = make_engine(tiny_checkpoint, "torch", max_num_seqs=3, max_num_batched_tokens=40)
    ip = engine.processor.image_processor
    ip.max_pixels = 112 * 140
    seen = {}
    encode, forward, sample = engine.model.encode_images, engine.model.forward, glmrt.engine.engine.Sampler.__call__
    monkeypatch.setattr(engine.model, "encode_images", lambda pixels, grids: seen.update(
        pixels=pixels, grids=grids) or encode(pixels, grids))
    monkeypatch.setattr(engine.model, "forward", lambda ids, *a: seen.update(tokens=len(ids)) or forward(ids, *a))
    monkeypatch.setattr(glmrt.engine.engine.Sampler, "__call__", lambda self, logits, rows, do_sample, *a: seen.update(
        rows=logits.shape[0], do_sample=do_sample) or sample(self, logits, rows, do_sample, *a))
    engine.run_worst_step()
    [(t, h, w)] = seen["grids"]
    assert t == 1 and h * w * 14 * 14 * 2 <= ip.max_pixels and seen["pixels"].dtype == torch.float32
    assert seen["pixels"].shape == (h * w, engine.config.vision.patch_dim)
    assert seen["tokens"] == 40 and seen["rows"] == 3 and seen["do_sample"]

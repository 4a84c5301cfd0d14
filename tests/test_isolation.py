"""One request never fails another inside the engine.

Constrained and unconstrained rows in any mix, arriving and finishing at any step (a yes/no
choice ends after a token or two), aborted or preempted, with speculation on or off: every
unconstrained request gives its solo output, and every constrained one a valid one. A step that
fails without a culprit is retried with its requests split into isolation groups until only the
request that breaks every step it is in fails.
"""
import json
import random
import re

import pytest

import glmrt
from glmrt.engine.engine import LLMEngine
from glmrt_testing.engine_checks import assert_all_free, run_until_done

CHOICES = ["yes", "no", "maybe so"]
PATTERN = r"[a-c]{1,3}-[0-9]"
SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "yy"]}}, "required": ["a"],
          "additionalProperties": False}


def make_engine(path, backend, **options):
    return LLMEngine(str(path), device="cpu", dtype="float32", backend=backend, **options)


def constrained(rng: random.Random, max_len: int) -> tuple[glmrt.SamplingParams, callable]:
    """Random constrained params -> (params, check(text) of a complete output)."""
    kind = rng.choice(["choice", "regex", "schema"])
    extra = dict(temperature=0.9, seed=rng.randrange(2**63)) if rng.random() < 0.5 else {}
    params = glmrt.SamplingParams(max_tokens=rng.randint(max_len // 2, max_len), **extra, **{
        "choice": dict(choice=CHOICES), "regex": dict(regex=PATTERN), "schema": dict(json_schema=SCHEMA)}[kind])
    check = {"choice": lambda t: t in CHOICES, "regex": lambda t: re.fullmatch(PATTERN, t) is not None,
             "schema": lambda t: json.loads(t)["a"] in ("x", "yy")}[kind]
    return params, check


def unconstrained(rng: random.Random, max_len: int) -> glmrt.SamplingParams:
    extra = dict(temperature=0.8, top_k=rng.choice([0, 2**63]), seed=rng.randrange(2**64)) if rng.random() < 0.5 else {}
    return glmrt.SamplingParams(max_tokens=rng.randint(3, max_len), repetition_penalty=rng.choice([1.0, 1.1]), **extra)


def workload(seed: int, n: int, max_len: int):
    """n jobs of at most max_len tokens: (request, params, check or None (unconstrained), arrival
    step, abort step or None). The first three always meet: a yes/no choice that ends after a
    token or two beside a greedy and a sampled unconstrained request; the rest are random."""
    rng = random.Random(seed)
    jobs = [({"prompt": "request a:"}, glmrt.SamplingParams(max_tokens=max_len, choice=CHOICES[:2]),
             lambda t: t in CHOICES[:2], 0, None),
            ({"prompt": "request b:"}, glmrt.SamplingParams(max_tokens=max_len), None, 0, None),
            ({"prompt": "request c:"}, glmrt.SamplingParams(max_tokens=max_len, temperature=1.0, seed=seed), None, 0,
             None)]
    for i in range(n - len(jobs)):
        request = {"prompt": f"request {i}: " + "word " * rng.randint(0, 5)}
        if rng.random() < 0.4:
            params, check = constrained(rng, max_len)
        else:
            params, check = unconstrained(rng, max_len), None
        abort = rng.randint(1, 10) if rng.random() < 0.2 else None
        jobs.append((request, params, check, rng.randint(0, 6), abort))
    return jobs


def run_mixed(engine, jobs) -> list:
    """Submit and abort the jobs at their steps -> each job's final output."""
    ids, done, step = {}, {}, 0
    while len(done) < len(jobs):
        for j, (request, params, _, arrive, abort) in enumerate(jobs):
            if arrive == step:
                ids[j] = engine.add_request(request, params)
            if abort == step and j in ids and ids[j] not in done:
                out = engine.abort(ids[j])
                if out is not None:
                    done[ids[j]] = out
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 2_000
    while engine.has_unfinished():  # a step in flight holds only tokens to drop
        assert engine.step() == []
    return [done[ids[j]] for j in range(len(jobs))]


# (backend, num_speculative_tokens, seeds, jobs per seed, their most tokens, KV-cache tokens): the
# KV cache holds 2-5 of the requests (20-56 tokens each), so they queue and are preempted. The
# Triton interpreter is slow: fewer, shorter requests there, and speculation on the torch backend
# only (test_spec_decode runs the Triton backend's speculative steps against plain greedy).
CASES = [
    ("torch", 0, range(1, 2), 8, 14, 128),
    ("torch", 3, range(1), 8, 14, 128),
    ("triton", 0, range(1), 5, 6, 64),
]


@pytest.mark.parametrize("backend,k,seeds,n,max_len,kv", CASES, ids=[f"{c[0]}-k{c[1]}" for c in CASES])
def test_constrained_and_unconstrained_rows_in_any_mix_keep_their_solo_outputs(tiny_checkpoint, backend, k, seeds, n,
                                                                               max_len, kv):
    engine = make_engine(tiny_checkpoint, backend, max_num_seqs=6, max_model_len=64, kv_cache_tokens=kv,
                         num_speculative_tokens=k)
    preempted = False
    for seed in seeds:
        jobs = workload(seed, n, max_len)
        mixed = run_mixed(engine, jobs)
        preempted |= engine.scheduler.num_preemptions > 0
        assert_all_free(engine)
        for (request, params, check, _, abort), out in zip(jobs, mixed):
            assert out.finish_reason != "error", (seed, out.error)
            if check is None:
                solo = engine.generate([request], [params])[0]
                if out.finish_reason == "abort":
                    assert solo.token_ids[: len(out.token_ids)] == out.token_ids, seed
                else:
                    assert (out.token_ids, out.text, out.finish_reason) == (solo.token_ids, solo.text,
                                                                            solo.finish_reason), seed
            elif out.finish_reason == "stop":
                assert check(out.text), (seed, out.text)
    assert preempted


def test_a_request_that_breaks_every_step_fails_alone_after_bisection(tiny_checkpoint, monkeypatch):
    """An injected device fault in every step that holds one request once it has two tokens
    (e.g. a kernel fault on its data): the step is retried in halves until that request runs
    alone and fails; the other seven give their solo tokens."""
    engine = make_engine(tiny_checkpoint, "torch", max_num_seqs=8)
    params = glmrt.SamplingParams(max_tokens=12)
    requests = [{"prompt": f"request {i}: " + "word " * i} for i in range(8)]
    solo = [engine.generate([r], [params])[0].token_ids for r in requests]
    ids = [engine.add_request(r, params) for r in requests]
    poisoned = engine._requests[ids[5]].seq
    failures = []

    launch = engine.runner.launch

    def faulty(step, *args, **kwargs):
        if poisoned in step.seqs and len(poisoned.output_token_ids) >= 2:
            failures.append(len(step.seqs))
            raise RuntimeError("injected device fault")
        return launch(step, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "launch", faulty)
    done = run_until_done(engine)
    assert done[ids[5]].finish_reason == "error" and "injected device fault" in done[ids[5]].error
    assert [done[i].token_ids for i in ids[:5] + ids[6:]] == solo[:5] + solo[6:]
    assert failures == [8, 4, 2, 1]  # the step, then the half, the quarter and the eighth that held it
    assert_all_free(engine)

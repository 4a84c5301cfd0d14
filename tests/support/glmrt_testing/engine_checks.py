"""Driving an LLMEngine step by step in tests, and checking that it holds nothing afterwards."""
from collections.abc import Callable

import torch


def run_until_done(engine) -> dict:
    """Step until nothing is left -> request id: its final output."""
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def assert_all_free(engine):
    """No request, KV block, image embedding or device row is held."""
    bm = engine.block_manager
    assert not engine.has_unfinished() and not engine.request_ids
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.runner.image_cache
    assert not engine.runner.batch.active.any() and not engine.runner.batch.context_lens.any()


class LogitsRecorder:
    """Records, per request id, the raw logits row [V] of every token an engine gives it, in order:
    at ModelRunner.logprobs_of, the one place every step's logits pass through (called for each
    step in which a row asks for log-probabilities: give every request `logprobs`), assigned to
    the step's sequences and the tokens each was given (1, or a verify step's accepted count)."""

    def __init__(self, engine):
        self.rows: dict[str, list] = {}
        self.preempted: list[str] = []  # request ids, each time one is preempted
        runner, pending = engine.runner, []
        seam = runner.logprobs_of

        def recording_seam(logits, tokens, num_logprobs):
            pending.append(logits.clone())
            return seam(logits, tokens, num_logprobs)

        runner.logprobs_of = recording_seam
        runner.launch = self._recording(runner.launch, pending)
        preempt = engine.scheduler._preempt

        def recording_preempt(seq):
            self.preempted.append(seq.request_id)
            preempt(seq)

        engine.scheduler._preempt = recording_preempt
        self.engine = engine

    def _recording(self, launch, pending):
        def recording(*args, **kwargs):
            handle = launch(*args, **kwargs)
            logits = pending.pop() if pending else None
            assert not pending
            if handle.seqs and logits is not None:  # recorded when the engine reads the step back,
                read = handle.tokens               # so steps still overlap as they do unrecorded

                def tokens_then_record():
                    new_tokens = read()
                    per_seq = logits.shape[0] // len(handle.seqs) if handle.speculative else 1
                    for i, (seq, new) in enumerate(zip(handle.seqs, new_tokens)):
                        self.rows.setdefault(seq.request_id, []).extend(logits[i * per_seq: i * per_seq + len(new)])
                    return new_tokens

                handle.tokens = tokens_then_record
            return handle
        return recording

    def generate(self, requests: list, params: list) -> list:
        """engine.generate -> (output, logits [its tokens, V]) per request, in order."""
        import torch

        outputs = self.engine.generate(requests, params)
        return [(out, torch.stack(self.rows.pop(out.request_id)[: len(out.token_ids)])) for out in outputs]


def logits_differences(got, want) -> list[str]:
    """What differs between two (output, logits) results of one request, bitwise ([]: nothing):
    its tokens, each token's logits (torch.equal), its reported log-probabilities."""
    import torch

    (out, logits), (ref, ref_logits) = got, want
    found = []
    if out.token_ids != ref.token_ids:
        found.append(f"tokens {out.token_ids} != {ref.token_ids}")
    n = min(len(logits), len(ref_logits))
    for i in range(n):
        if not torch.equal(logits[i], ref_logits[i]):
            diff = (logits[i].float() - ref_logits[i].float()).abs().max().item()
            found.append(f"token {i}: logits differ (max |diff| {diff:.3g})")
    entries = lambda o: [list(entry.items()) for entry in (o.logprobs or [])[:n]]  # noqa: E731 (in order)
    if entries(out) != entries(ref):
        found.append("log-probabilities differ")
    return found


class OracleDrafts:
    """Stands in for an engine's MTP drafter (SpeculativeDecoder.propose): each running request's
    known continuation, `continuation(seq)` (its generated tokens), from its context on, after
    the MTP catch-up the real drafter runs (so the MTP cache is kept). `replace(seq, n, drafts)`,
    when given, may change a row's k drafts (n: the row's context length) -> the k to propose."""

    def __init__(self, engine, continuation: Callable, replace: Callable | None = None):
        self.engine, self.continuation, self.replace = engine, continuation, replace
        self.spec = engine.runner.spec
        self.spec.propose = self

    def __call__(self, bs):
        self.spec.catch_up(bs)
        k, drafts = self.spec.k, torch.zeros(bs, self.spec.k, dtype=torch.int64)
        for row, seq in enumerate(self.engine.scheduler.running):
            full = seq.prompt_token_ids + self.continuation(seq)
            n = int(self.spec.batch.context_lens[row])
            known = (full[n + 1: n + 1 + k] + [0] * k)[:k]
            drafts[row] = torch.tensor(known if self.replace is None else self.replace(seq, n, known))
        return drafts

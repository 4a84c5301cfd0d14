"""A request's output side: the text of the tokens read back, its stop strings, its RequestOutputs.

The engine core reads tokens back and appends them to the Sequence; a RequestState turns them into
text (incremental detokenization), finds stop strings in it and makes the request's outputs. The
work per token is O(1) in the length of the output: deltas come from the tokenizer's
DecodeStream, stop strings are searched in the new text only, and an output refers to the
request's growing lists (outputs.Prefix) rather than copying them. A "final_only" request (SamplingParams.output_kind) gets
no output before it finishes, and without stop strings its text is decoded once, at the end: per
token only the token checks remain.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence as Ids

from ..outputs import Prefix, RequestOutput
from .detokenizer import IncrementalDetokenizer
from .sequence import FINISHED, Sequence
from .stop import StopChecker


class RequestState:
    __slots__ = ("seq", "detokenizer", "stops", "eos_token_ids", "final_only", "text_at_end", "searching",
                 "first_token_time")

    def __init__(self, seq: Sequence, decode: Callable[[Ids[int]], str], eos_token_ids: frozenset[int]):
        self.seq = seq
        self.detokenizer = IncrementalDetokenizer(decode)
        params = seq.sampling_params
        self.stops = StopChecker(params.stop or [], params.include_stop_str_in_output)
        # An eos token that ends a request is no stop_reason, even when stop_token_ids lists it (vLLM).
        self.eos_token_ids = eos_token_ids
        self.final_only = params.output_kind == "final_only"
        self.searching = bool(self.stops.stop)  # stop strings to look for in the new text
        self.text_at_end = self.final_only and not self.searching  # no text is needed before the end
        self.first_token_time: float | None = None  # time.monotonic() when its first token was read

    def read(self, new_tokens: list[int], logprobs: list[dict[int, float]] | None,
             accept: Callable[[object, int], bool]) -> RequestOutput | None:
        """A step's tokens for this request, read back -> its output (None for a final_only request
        that has not finished). Token by token, as without speculation: tokens after the one that
        ends the request (stop token or string, length, a completed constraint) are dropped.
        logprobs: one entry per token, when it asked for them; accept(grammar, token): whether the
        token completes a constrained request. Each token is added to the text (and searched for
        stop strings) here; as in vLLM, a stop token is left out of the text (kept with
        include_stop_str_in_output), and a stop string in the new text ends the request with
        "stop", also when this token reached the length limit."""
        seq, stops, detokenizer, by_token, count = self.seq, self.stops, self.detokenizer, False, 0
        searching, text = self.searching, ""  # text: without stop strings, the tokens' text, handed out whole
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        for token in new_tokens:
            if logprobs is not None:  # O(1): the one list of the request grows
                seq.logprobs.append(logprobs[count])
            count += 1
            seq.append_token(token)
            if seq.grammar is not None and accept(seq.grammar, token) and seq.status is not FINISHED:
                seq.finish("stop")  # an ignored eos that completes the constraint still ends it
            by_token = seq.finish_reason == "stop"  # a stop token (or a completed constraint) ended it
            if not by_token or seq.sampling_params.include_stop_str_in_output:  # else the token is no text
                if self.text_at_end:
                    detokenizer.extend((token,))
                elif not searching:
                    text += detokenizer.add_token(token)
                elif stops.add(detokenizer.add_token(token)) is not None and seq.finish_reason in (None, "length", "stop"):
                    seq.finish("stop")
            if seq.status is FINISHED:
                break
        if seq.status is not FINISHED:
            if self.final_only:
                return None
            # Streaming and going on (no stop string found: it would have finished the request).
            return self._made(stops.pop_delta(False) if searching else stops.send(text), new_tokens, None)
        stops.add(text)  # output() hands it out with the rest
        return self.output(new_tokens if count == len(new_tokens) else new_tokens[:count], by_token)

    def output(self, new_tokens: list[int], by_token: bool = False) -> RequestOutput:
        """The request's output after `new_tokens` were read back and absorbed ([] when it was
        aborted or failed); by_token: the last of them is a stop token that ended it, which
        delta_token_ids leaves out, as the text does (unless include_stop_str_in_output). An
        aborted or failed request keeps its reason. A final_only request's one output has every
        token in its delta."""
        seq, stops, params = self.seq, self.stops, self.seq.sampling_params
        if self.final_only:
            new_tokens = list(seq.output_token_ids)
        if seq.is_finished:
            stops.add(self.detokenizer.finish())  # the tail held back as an incomplete character
        if stops.stop_str is not None and seq.finish_reason in (None, "length", "stop"):
            seq.finish("stop")
        stop_reason = None  # the stop string, or the stop_token_ids token (not an eos) that ended it
        if seq.finish_reason == "stop":
            token = seq.output_token_ids[-1]
            stop_reason = stops.stop_str
            if stop_reason is None and token in (params.stop_token_ids or ()) and (
                    params.ignore_eos or token not in self.eos_token_ids):
                stop_reason = token
        return self._made(stops.pop_delta(seq.is_finished),
                          new_tokens[:-1] if by_token and not params.include_stop_str_in_output else new_tokens,
                          stop_reason)

    def _made(self, delta_text: str, delta_token_ids: list[int], stop_reason: int | str | None) -> RequestOutput:
        """The request's output now: its tokens and text so far (a Prefix of its growing lists,
        taken after delta_text was handed out), its sequence's finish reason and error, and the
        step's deltas."""
        seq = self.seq
        so_far = Prefix(seq.output_token_ids, self.stops.sent)
        return RequestOutput.made({
            "request_id": seq.request_id, "prompt_token_ids": seq.prompt_token_ids, "token_ids": so_far, "text": so_far,
            "finish_reason": seq.finish_reason, "delta_text": delta_text, "delta_token_ids": delta_token_ids,
            "error": seq.error, "stop_reason": stop_reason, "logprobs": seq.logprobs,
            "first_token_time": self.first_token_time})

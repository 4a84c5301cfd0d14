"""SamplingParams validation: vLLM's ranges, strict types, errors that name the field and the value."""
import math
import re

import numpy as np
import pytest
import torch

from glmrt import SamplingParams

BAD = [
    # (field, value, how the message shows the value after "got")
    ("temperature", math.nan, "nan"),
    ("temperature", math.inf, "inf"),
    ("temperature", -0.5, "-0.5"),
    ("temperature", 1e39, "1e+39"),  # inf in the sampler's fp32
    ("temperature", 10000.5, "10000.5"),
    ("temperature", "0.7", "'0.7'"),
    ("temperature", True, "True"),
    ("temperature", None, "None"),
    ("top_p", 0.0, "0.0"),
    ("top_p", 1.5, "1.5"),
    ("top_p", math.nan, "nan"),
    ("top_p", "1", "'1'"),
    ("top_k", -2, "-2"),
    ("top_k", 5.0, "5.0"),
    ("top_k", True, "True"),
    ("top_k", "5", "'5'"),
    ("repetition_penalty", math.nan, "nan"),
    ("repetition_penalty", -math.inf, "-inf"),
    ("repetition_penalty", 0, "0.0"),
    ("repetition_penalty", -1.0, "-1.0"),
    ("repetition_penalty", 1e-39, "1e-39"),  # 0 in fp32: x / p is inf
    ("repetition_penalty", 2e4, "20000.0"),
    ("max_tokens", 0, "0"),
    ("max_tokens", -3, "-3"),
    ("max_tokens", 10.0, "10.0"),
    ("max_tokens", False, "False"),
    ("max_tokens", "8", "'8'"),
    ("max_tokens", None, "None"),
    ("seed", 2**64, str(2**64)),
    ("seed", -(2**63) - 1, str(-(2**63) - 1)),
    ("seed", 1.5, "1.5"),
    ("seed", True, "True"),
    ("seed", "7", "'7'"),
    ("stop_token_ids", [1, -2], "-2"),
    ("stop_token_ids", [1, 2.0], "2.0"),
    ("stop_token_ids", [True], "True"),
    ("stop_token_ids", ["3"], "'3'"),
    ("stop_token_ids", 5, "5"),
    ("stop_token_ids", "12", "'12'"),
    ("stop", "", "''"),
    ("stop", [""], "''"),
    ("stop", ["a", 3], "3"),
    ("stop", [None], "None"),
    ("stop", 5, "5"),
    ("stop", b"a", "b'a'"),
    ("include_stop_str_in_output", 1, "1"),
    ("include_stop_str_in_output", None, "None"),
    ("ignore_eos", 1, "1"),
    ("ignore_eos", "no", "'no'"),
    ("skip_special_tokens", None, "None"),
    ("skip_special_tokens", 0, "0"),
    ("output_kind", "delta", "'delta'"),
    ("output_kind", None, "None"),
]


@pytest.mark.parametrize("field,value,shown", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_values_are_rejected_naming_field_and_value(field, value, shown):
    with pytest.raises((TypeError, ValueError)) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert f"SamplingParams.{field}" in message
    got = message.split(" got ", 1)[1]
    assert re.search(rf"(?<![\w.'-]){re.escape(shown)}(?![\w.'])", got), message


@pytest.mark.parametrize("temperature", [0, 0.0, 1e-6, 9.9e-6, 1e-39])
def test_tiny_temperature_is_greedy_and_turns_filters_off(temperature):
    p = SamplingParams(temperature=temperature, top_k=5, top_p=0.5)
    assert p.greedy
    assert (p.top_k, p.top_p) == (0, 1.0)


def test_valid_values_are_kept_and_normalised():
    p = SamplingParams(max_tokens=np.int64(7), temperature=1, top_k=-1, top_p=np.float32(0.5),
                       repetition_penalty=2, stop_token_ids=(3, np.int32(4)), seed=2**64 - 1)
    assert not p.greedy
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (7, 1.0, -1, 0.5, 2.0)
    assert type(p.max_tokens) is int and type(p.temperature) is float and type(p.top_p) is float
    assert p.stop_token_ids == [3, 4] and all(type(t) is int for t in p.stop_token_ids)
    assert not SamplingParams(temperature=1e-5).greedy
    assert SamplingParams(top_k=0).top_k == 0 and SamplingParams(top_k=1, temperature=1).top_k == 1


def test_stop_strings_are_normalised_to_a_list():
    assert SamplingParams().stop is None and not SamplingParams().include_stop_str_in_output
    assert SamplingParams(stop="<|user|>").stop == ["<|user|>"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop=[]).stop == []


@pytest.mark.parametrize("seed", [-(2**63), 0, 2**63, 2**64 - 1])
def test_every_accepted_seed_seeds_a_torch_generator(seed):
    torch.Generator().manual_seed(SamplingParams(seed=seed).seed)

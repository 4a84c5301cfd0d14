"""generation_config.json gives the default SamplingParams, resolved the way transformers' generate() does."""
import json
import shutil

import pytest

import glmrt
from glmrt.generation_config import GenerationConfig
from glmrt_testing.helpers import IMAGES

VARIANTS = [
    {},  # no sampling fields: transformers' defaults, greedy
    {"do_sample": False, "eos_token_id": [59246, 59253], "pad_token_id": 59246},  # GLM-OCR's
    {"do_sample": False, "temperature": 0.7, "top_k": 5, "top_p": 0.8, "repetition_penalty": 1.3},
    {"temperature": 0.7, "top_p": 0.8},  # do_sample absent = false
    {"do_sample": True},
    {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 100, "eos_token_id": 7},
    {"do_sample": True, "temperature": 1.2, "top_k": 0, "repetition_penalty": 1.1, "max_new_tokens": None},
    {"do_sample": True, "temperature": 0.0, "top_k": 20},
]


def hf_resolved(data):
    """transformers' view: the file's values, then its global defaults for whatever is unset."""
    from transformers import GenerationConfig as HFGenerationConfig

    hf = HFGenerationConfig.from_dict(dict(data))
    for name, value in HFGenerationConfig._get_default_generation_params().items():
        if getattr(hf, name, None) is None:
            setattr(hf, name, value)
    return hf


def write_config(directory, data):
    (directory / "generation_config.json").write_text(json.dumps(data) if not isinstance(data, str) else data)
    return directory


@pytest.mark.parametrize("data", VARIANTS, ids=[json.dumps(v) for v in VARIANTS])
def test_defaults_match_transformers(tmp_path, data):
    params = GenerationConfig.from_pretrained(write_config(tmp_path, data)).sampling_params()
    hf = hf_resolved(data)
    sampling = hf.do_sample and hf.temperature > 0
    assert params.greedy == (not sampling)
    if sampling:
        assert (params.temperature, params.top_k, params.top_p) == pytest.approx((hf.temperature, hf.top_k, hf.top_p))
    assert params.repetition_penalty == pytest.approx(hf.repetition_penalty)
    assert params.max_tokens == (hf.max_new_tokens or glmrt.sampling_params.DEFAULT_MAX_TOKENS)
    eos = data.get("eos_token_id")
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_ids == tuple(
        [] if eos is None else eos if isinstance(eos, list) else [eos]
    )


def test_no_file_is_greedy_and_overrides_win(tmp_path):
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config.sampling_params().greedy and config.eos_token_ids == ()
    sampling = GenerationConfig.from_pretrained(write_config(tmp_path, {"do_sample": True, "top_k": 5}))
    params = sampling.sampling_params(temperature=0.5, max_tokens=3)
    assert (params.temperature, params.top_k, params.max_tokens) == (0.5, 5, 3)
    assert sampling.sampling_params(temperature=0).greedy


BAD_FILES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({"do_sample": "yes"}, "do_sample"),
    ({"temperature": "hot"}, "temperature='hot'"),
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_k": 1.5}, "top_k=1.5"),
    ({"top_p": 2}, "top_p=2"),
    ({"repetition_penalty": 0}, "repetition_penalty=0"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"eos_token_id": "x"}, "eos_token_id"),
    ({"eos_token_id": [1, -1]}, "eos_token_id"),
]


@pytest.mark.parametrize("data,field", BAD_FILES, ids=[f for _, f in BAD_FILES])
def test_bad_files_name_the_file_and_field(tmp_path, data, field):
    if not isinstance(data, str):
        data = json.dumps(data)  # json.dumps writes NaN, which Python's json reads back
    with pytest.raises(ValueError) as info:
        GenerationConfig.from_pretrained(write_config(tmp_path, data))
    assert "generation_config.json" in str(info.value) and field in str(info.value)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint, tmp_path_factory):
    path = shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("gen-config") / "ckpt")
    write_config(path, {"do_sample": False, "temperature": 0.9, "repetition_penalty": 1.5, "max_new_tokens": 3,
                        "eos_token_id": [59246, 59253, 7]})
    return glmrt.LLM(str(path), device="cpu", dtype="float32", backend="torch")


def test_llm_uses_the_file_when_no_params_are_given(llm):
    defaults = llm.get_default_sampling_params()
    assert defaults.greedy and (defaults.repetition_penalty, defaults.max_tokens) == (1.5, 3)
    assert llm.get_default_sampling_params() is not defaults  # callers may change their copy
    assert llm.generation_config.eos_token_ids == (59246, 59253, 7)
    request = {"images": [IMAGES["small"]], "prompt": "Text Recognition:"}
    explicit = llm.generate(request, glmrt.SamplingParams(max_tokens=3, repetition_penalty=1.5))[0]
    implicit = llm.generate(request)[0]
    assert len(implicit.token_ids) <= 3
    assert implicit.token_ids == explicit.token_ids
    assert llm.ocr(IMAGES["small"]) == explicit.text


@pytest.mark.parametrize("bad,name", [({"temperature": 0}, "dict"), ([{"max_tokens": 3}], "dict"),
                                      ("greedy", "str"), ((glmrt.SamplingParams(), None), "NoneType")])
def test_wrong_sampling_params_type_is_named(llm, bad, name):
    request = {"images": [IMAGES["small"]], "prompt": "Text Recognition:"}
    with pytest.raises(TypeError, match=rf"sampling_params.*{name}"):
        llm.generate([request, request] if isinstance(bad, tuple) else request, bad)
    assert not llm.engine.has_unfinished()

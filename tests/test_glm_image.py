"""GLM-Image's autoregressive stage vs transformers' own GlmImageForConditionalGeneration on a
tiny random checkpoint in the Hub's pipeline layout (fp32).

Prompt ids, condition-image codes and 3D positions identical; prefill and decode logits within
1e-4; greedy image tokens identical to transformers' generate for text-to-image and
image-to-image, alone and batched under preemption; the first sampled token follows
transformers' sampling distribution (chi-square); the output grids are the documented slices.
"""
import dataclasses
import shutil

import pytest
import torch

import glmrt
from glmrt.engine.runner import allocate_kv_cache
from glmrt.model.positions import glm_image_positions
from glmrt.model.text import AttentionMetadata
from glmrt_testing.helpers import chi_square_passes, make_image
from glmrt_testing.tiny_glm_image import GENERATION_CONFIG, IMAGE_END, IMAGE_START, build_glm_image_checkpoint

IMAGE_TOKEN = 167855
CONDITIONS = {"a": make_image(90, 70, 3), "b": make_image(64, 150, 4)}
# (prompt, condition image names, height, width); the preview grid alone is ~256 tokens.
CASES = {
    "t2i": ("a cat on a mat", [], 96, 160),
    "i2i": ("make it blue", ["a"], 128, 96),
    "i2i-two": ("the cat from the first, the mat from the second", ["a", "b"], 64, 64),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_glm_image_checkpoint(tmp_path_factory.mktemp("tiny-glm-image"))


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import GlmImageForConditionalGeneration

    return GlmImageForConditionalGeneration.from_pretrained(
        checkpoint / "vision_language_encoder", dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_processor(checkpoint, torchvision_available):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint / "processor")


@pytest.fixture(scope="module")
def llm(checkpoint):
    return glmrt.LLM(str(checkpoint), device="cpu", dtype="float32", backend="torch")


def hf_inputs(hf_processor, case):
    prompt, names, height, width = CASES[case]
    content = [{"type": "image"} for _ in names] + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    text = hf_processor.apply_chat_template(messages, tokenize=False)
    images = [CONDITIONS[n] for n in names] or None
    return dict(hf_processor(text=[text], images=images, target_h=height, target_w=width, return_tensors="pt"))


def request(case) -> glmrt.ImageRequest:
    prompt, names, height, width = CASES[case]
    return glmrt.ImageRequest(prompt, height, width, [CONDITIONS[n] for n in names])


def hf_codes_in_prompt(hf_model, inputs) -> torch.Tensor:
    """input_ids [P] with the condition images' codes in place, as GlmImageModel.forward writes them."""
    ids = inputs["input_ids"][0]
    if "pixel_values" not in inputs:
        return ids
    m = hf_model.model
    with torch.no_grad():
        sources = m.get_image_grids_for_generation(inputs["images_per_sample"], inputs["image_grid_thw"])
        features = m.get_image_features(inputs["pixel_values"], sources).pooler_output
        codes = m.get_image_tokens(features).view(-1)
    return ids.masked_scatter(ids == IMAGE_TOKEN, codes)


def hf_generate(hf_model, inputs, **kwargs) -> list[int]:
    grids = inputs["image_grid_thw"].tolist()
    targets = grids[-2:] if "pixel_values" not in inputs else grids[-1:]
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=sum(t * h * w for t, h, w in targets) + 1, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def hf_greedy(hf_model, hf_processor):
    """Each case's greedy continuation by transformers' generate (computed once)."""
    return {case: hf_generate(hf_model, hf_inputs(hf_processor, case), do_sample=False) for case in CASES}


# ---------------------------------------------------------------------------- prompt side


@pytest.mark.parametrize("case", CASES)
def test_prompt_and_codes_match_transformers(llm, hf_model, hf_processor, case):
    inputs = hf_inputs(hf_processor, case)
    processed = llm.processor(request(case))
    assert processed.input_ids == inputs["input_ids"][0].tolist()
    assert [list(g) for g in processed.source_grids + processed.target_grids] == inputs["image_grid_thw"].tolist()
    if processed.source_grids:
        assert torch.equal(llm.processor.image_processor.normalize_patches(processed.pixel_values)
                           if processed.pixel_values.dtype == torch.uint8 else processed.pixel_values,
                           inputs["pixel_values"])
    # The prefill puts the codes in place of the placeholders on the device without waiting for
    # them; the host prompt gets them when that step is read (one step later, with overlap).
    seq = llm.engine.prepare(request(case))
    llm.engine.enqueue(seq)
    llm.engine.step()
    assert seq.prompt_token_ids == inputs["input_ids"][0].tolist()
    # ... while the repetition penalty already counts them as seen (as every prompt id it can emit)
    codes_in_prompt = hf_codes_in_prompt(hf_model, inputs)
    vocab = llm.engine.config.text.output_vocab_size
    seen = set(llm.engine.runner.batch.sampling.presence[seq.row].nonzero()[:, 0].tolist())
    prompt_seen = {t for t in codes_in_prompt.tolist() if t < vocab}
    assert prompt_seen <= seen and len(seen - prompt_seen) <= 1  # and the token the prefill sampled
    llm.engine.step()
    assert seq.prompt_token_ids == codes_in_prompt.tolist()
    assert seq.request_id not in llm.engine.runner.image_cache  # the prompt holds the codes now
    llm.engine.abort(seq.request_id)


@pytest.mark.parametrize("case", CASES)
def test_positions_match_get_rope_index(hf_model, hf_processor, case):
    inputs = hf_inputs(hf_processor, case)
    ids = hf_codes_in_prompt(hf_model, inputs)
    theirs, deltas = hf_model.model.get_rope_index(ids[None], inputs["image_grid_thw"], inputs["images_per_sample"])
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    prompt, decode = glm_image_positions(ids.tolist(), grids, IMAGE_START, IMAGE_END)
    assert torch.equal(prompt, theirs[:, 0])
    assert torch.equal(decode, hf_model.model._cached_decode_position_ids[0])
    assert not deltas.any()


def test_target_grids_follow_the_processor():
    from transformers.models.glm_image.processing_glm_image import GlmImageProcessor as HF

    for height, width in [(1024, 1024), (1152, 768), (96, 160), (2048, 512), (33, 4000)]:
        th, tw, ph, pw = HF._get_target_shape(None, height, width)
        assert glmrt.glm_image.target_grids(height, width, True) == [(1, th, tw), (1, ph, pw)]
        assert glmrt.glm_image.target_grids(height, width, False) == [(1, th, tw)]
    assert glmrt.glm_image.generation_length([(1, 32, 32), (1, 16, 16)]) == 1281  # a 1024² image
    for bad in (0, 31, 64.0, True, "64"):
        with pytest.raises(ValueError, match="height must be an int >= 32"):
            glmrt.ImageRequest("x", bad, 64)


def test_output_slices_the_grids_in_generation_order():
    """Preview first, then the full grid, then image_end; a complete image ends with "stop" although
    its last token is also its max_tokens-th; one cut short has no grid."""
    req = glmrt.ImageRequest("x", 64, 96, [])  # full grid 2 x 3, preview 13 x 19
    (_, th, tw), (_, ph, pw) = req.targets
    cells = list(range(ph * pw + th * tw))
    out = glmrt.RequestOutput(request_id="r", prompt_token_ids=[1, IMAGE_START], token_ids=cells + [IMAGE_END],
                              text="", finish_reason="length")
    result = glmrt.ImageTokensOutput.from_output(out, req, [], IMAGE_START, IMAGE_END)
    assert result.finish_reason == "stop" and (result.preview_grid, result.target_grid) == ((ph, pw), (th, tw))
    assert torch.equal(result.preview_tokens, torch.arange(ph * pw).view(ph, pw))
    assert torch.equal(result.image_tokens, torch.arange(ph * pw, len(cells)).view(th, tw))
    short = dataclasses.replace(out, token_ids=cells[:-1] + [IMAGE_END], finish_reason="stop")
    result = glmrt.ImageTokensOutput.from_output(short, req, [], IMAGE_START, IMAGE_END)
    assert result.image_tokens is None and result.preview_tokens is not None and result.finish_reason == "stop"


# -------------------------------------------------------------------------------- logits


def prefill_and_decode_logits(model, ids, grids, forced):
    """Our model: a prefill of `ids` [P], then one decode step per token of `forced` through the
    paged cache -> logits [1 + len(forced), V] (the prefill's last row, then each step's)."""
    prompt_pos, decode_pos = glm_image_positions(ids.tolist(), grids, IMAGE_START, IMAGE_END)
    total, block = len(ids) + len(forced), 16
    caches = allocate_kv_cache(model, -(-total // block), block)
    p = len(ids)
    attn = AttentionMetadata(slot_mapping=torch.arange(p), cu_seqlens=torch.tensor([0, p], dtype=torch.int32),
                             max_seqlen=p)
    rows = [model.compute_logits(model.forward(ids, prompt_pos, attn, caches))[-1]]
    table = torch.arange(-(-total // block), dtype=torch.int32)[None]
    for j, token in enumerate(forced):
        attn = AttentionMetadata(slot_mapping=torch.tensor([p + j]), block_tables=table,
                                 context_lens=torch.tensor([p + j + 1], dtype=torch.int32))
        hidden = model.forward(torch.tensor([token]), decode_pos[:, j: j + 1], attn, caches)
        rows.append(model.compute_logits(hidden)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("case", ["t2i", "i2i-two"])
def test_prefill_and_decode_logits_match(llm, hf_model, hf_processor, case):
    from transformers import DynamicCache

    inputs = hf_inputs(hf_processor, case)
    forced = [5, 16000, 77, 3]
    cache = DynamicCache(config=hf_model.config)
    theirs = []
    with torch.no_grad():
        out = hf_model(**inputs, cache=cache, use_cache=True)
        theirs.append(out.logits[0, -1])
        for token in forced:
            out = hf_model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True,
                           image_grid_thw=inputs["image_grid_thw"], images_per_sample=inputs["images_per_sample"])
            theirs.append(out.logits[0, -1])
    theirs = torch.stack(theirs)
    ids = hf_codes_in_prompt(hf_model, inputs)
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    ours = prefill_and_decode_logits(llm.engine.model, ids, grids, forced)
    assert ours.shape == theirs.shape == (len(forced) + 1, 16512)
    assert (ours - theirs).abs().max() / theirs.abs().max() <= 1e-4


# ------------------------------------------------------------------------------ generation


def greedy() -> glmrt.SamplingParams:
    return glmrt.SamplingParams(temperature=0.0)


@pytest.mark.parametrize("case", CASES)
def test_greedy_image_tokens_match_generate(llm, hf_greedy, hf_model, hf_processor, case):
    prompt, names, height, width = CASES[case]
    [out] = llm.generate_image_tokens(prompt, height=height, width=width, images=[CONDITIONS[n] for n in names],
                                      sampling_params=greedy())
    theirs = hf_greedy[case]
    assert out.token_ids == theirs
    codes_in_prompt = hf_codes_in_prompt(hf_model, hf_inputs(hf_processor, case))
    assert out.prompt_token_ids == codes_in_prompt.tolist()
    if names:
        inputs = hf_inputs(hf_processor, case)
        assert torch.equal(torch.cat([c.reshape(-1) for c in out.condition_image_tokens]),
                           codes_in_prompt[inputs["input_ids"][0] == IMAGE_TOKEN])
    assert out.finish_reason == ("stop" if theirs[-1] == IMAGE_END else "length")
    targets = request(case).targets
    assert out.target_grid == targets[0][1:]
    th, tw = out.target_grid
    cells = theirs[:-1] if theirs[-1] == IMAGE_END else theirs
    offset = 0
    if len(targets) > 1:  # text-to-image: the preview grid comes first
        ph, pw = out.preview_grid
        assert torch.equal(out.preview_tokens, torch.tensor(cells[: ph * pw]).view(ph, pw))
        offset = ph * pw
    if len(cells) >= offset + th * tw:
        assert torch.equal(out.image_tokens, torch.tensor(cells[offset: offset + th * tw]).view(th, tw))
    else:
        assert out.image_tokens is None
    assert len(out.condition_image_tokens) == len(names)


def test_triton_backend_matches_generate(checkpoint, hf_greedy):
    """The Triton kernels (interpreter) on the shortest case: image-to-image, 13 tokens."""
    llm = glmrt.LLM(str(checkpoint), device="cpu", dtype="float32", backend="triton")
    prompt, names, height, width = CASES["i2i"]
    [out] = llm.generate_image_tokens(prompt, height=height, width=width, images=[CONDITIONS[n] for n in names],
                                      sampling_params=greedy())
    assert out.token_ids == hf_greedy["i2i"]


def test_batched_under_preemption_matches_one_by_one(checkpoint, hf_greedy):
    """Five requests, text-to-image and image-to-image mixed, in a KV cache that holds about two:
    every request is token-identical to transformers' generate alone."""
    llm = glmrt.LLM(str(checkpoint), device="cpu", dtype="float32", backend="torch", kv_cache_tokens=640,
                    max_model_len=640, max_num_seqs=4)
    order = ["t2i", "i2i", "t2i", "i2i-two", "t2i"]
    seqs = llm.engine.prepare_many([request(c) for c in order], [greedy()] * len(order))
    outputs = llm.engine.run(seqs)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == [hf_greedy[c] for c in order]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_generation_config_defaults_are_used(llm):
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k) == (
        GENERATION_CONFIG["temperature"], GENERATION_CONFIG["top_p"], GENERATION_CONFIG["top_k"])
    seq = llm.engine.prepare(request("i2i"))
    assert seq.sampling_params.temperature == GENERATION_CONFIG["temperature"]
    assert seq.sampling_params.max_tokens == 4 * 3 + 1  # the target grid, then image_end
    assert IMAGE_END in seq.stop_token_ids


def test_first_sampled_token_follows_transformers_distribution(checkpoint, hf_model, hf_processor):
    """3000 seeded requests (prefilled 256 at a time), one token each, under the checkpoint's sampling defaults, against
    transformers' temperature / top-k / top-p warpers over its own prefill logits."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    inputs = hf_inputs(hf_processor, "t2i")
    with torch.no_grad():
        scores = hf_model(**inputs).logits[:, -1]
    ids = inputs["input_ids"]
    g = GENERATION_CONFIG
    for warper in (TemperatureLogitsWarper(g["temperature"]), TopKLogitsWarper(g["top_k"]), TopPLogitsWarper(g["top_p"])):
        scores = warper(ids, scores)
    probs = torch.softmax(scores[0], -1)
    n = 3000
    wide = glmrt.LLM(str(checkpoint), device="cpu", dtype="float32", backend="torch", max_num_seqs=256)
    defaults = wide.get_default_sampling_params()
    seqs = wide.engine.prepare_many([request("t2i")] * n, [dataclasses.replace(defaults, seed=i) for i in range(n)])
    for seq in seqs:  # one token each (t2i requests are given their grids' length): the limit cut to one
        seq.sampling_params = dataclasses.replace(seq.sampling_params, max_tokens=1)
        seq.max_total_tokens = seq.num_prompt_tokens + 1
    firsts = torch.tensor([o.token_ids[0] for o in wide.engine.run(seqs)])
    assert int((probs > 0).sum()) > 50  # a wide distribution, not a near-greedy one
    assert chi_square_passes(torch.bincount(firsts, minlength=probs.shape[0]), probs)


# ---------------------------------------------------------------------------- API and errors


def test_flat_directory_works_too(checkpoint, tmp_path, hf_greedy):
    flat = tmp_path / "flat"
    shutil.copytree(checkpoint / "vision_language_encoder", flat)
    for f in (checkpoint / "processor").iterdir():
        shutil.copy(f, flat / f.name)
    llm = glmrt.LLM(str(flat), device="cpu", dtype="float32", backend="torch")
    prompt, names, height, width = CASES["i2i"]
    [out] = llm.generate_image_tokens(prompt, height, width, images=[CONDITIONS[n] for n in names],
                                      sampling_params=greedy())
    assert out.token_ids == hf_greedy["i2i"]


def test_hub_id_fetches_only_the_ar_stage(checkpoint, tmp_path, monkeypatch):
    """A Hub id whose repo is a diffusers pipeline: only vision_language_encoder/ and processor/
    are downloaded (huggingface_hub stubbed by a copy of the files its patterns select)."""
    import fnmatch

    import huggingface_hub
    from glmrt.loader import model_dirs, resolve_model_path

    repo = tmp_path / "repo"
    shutil.copytree(checkpoint, repo)
    (repo / "transformer").mkdir()
    (repo / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not for glmrt")
    calls, snapshot = [], tmp_path / "snapshot"

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        for f in repo.rglob("*"):
            name = f.relative_to(repo).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    path = resolve_model_path("zai-org/GLM-Image")
    assert calls[0] == ("zai-org/GLM-Image", ["model_index.json"])
    assert all(p.startswith(("vision_language_encoder/", "processor/")) for p in calls[1][1])
    assert not (path / "transformer").exists()
    assert model_dirs(path) == (path / "vision_language_encoder", path / "processor")
    assert (path / "vision_language_encoder" / "model.safetensors").is_file()


def test_many_prompts_with_their_own_images(llm, hf_greedy):
    outs = llm.generate_image_tokens(["make it blue", "make it blue"], 128, 96, images=[[CONDITIONS["a"]]] * 2,
                                     sampling_params=greedy())
    assert [o.token_ids for o in outs] == [hf_greedy["i2i"]] * 2
    with pytest.raises(ValueError, match="one list of condition images per prompt"):
        llm.generate_image_tokens(["x", "y"], 64, 64, images=[CONDITIONS["a"]])


def test_wrong_model_for_the_api_is_refused(llm, tiny_checkpoint):
    with pytest.raises(TypeError, match="must be a glmrt.ImageRequest"):
        llm.generate({"prompt": "hello"})
    with pytest.raises(ValueError, match="structured output and stop strings"):
        llm.generate_image_tokens("x", 64, 64, sampling_params=glmrt.SamplingParams(stop=["a"]))
    with pytest.raises(ValueError, match=r"SamplingParams\.logprobs: GLM-Image requests report no log-probabilities"):
        llm.generate_image_tokens("x", 64, 64, sampling_params=glmrt.SamplingParams(logprobs=1))
    ocr = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")
    with pytest.raises(ValueError, match="needs a GLM-Image checkpoint"):
        ocr.generate_image_tokens("x", 64, 64)


def test_speculation_is_refused(checkpoint):
    with pytest.raises(ValueError, match="no MTP layer"):
        glmrt.LLM(str(checkpoint), device="cpu", dtype="float32", num_speculative_tokens=1)


def test_worst_step_runs_the_largest_condition_image(llm, monkeypatch):
    """The step that sizes the KV cache on a GPU: the largest condition image through the vision
    tower and the VQ tokenizer, a full prefill and sampling over the vision vocabulary."""
    seen = {}
    encode = llm.engine.model.encode_images
    monkeypatch.setattr(llm.engine.model, "encode_images",
                        lambda pixels, grids: seen.update(pixels=pixels, grids=grids) or encode(pixels, grids))
    llm.engine.run_worst_step()
    [(t, h, w)] = seen["grids"]
    ip = llm.processor.image_processor
    assert t == 1 and h * w * 16 * 16 <= ip.max_pixels and seen["pixels"].shape == (h * w, 3 * 16 * 16)


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_graph_decode_matches_eager_and_transformers(checkpoint):
    """On CUDA: graph decode (bf16, greedy and seeded sampling, text-to-image and image-to-image
    batched) gives eager serial decode's tokens, and fp32 greedy tokens equal transformers' fp32
    generate on the same GPU."""
    from transformers import AutoProcessor, GlmImageForConditionalGeneration

    sampled = glmrt.SamplingParams(temperature=0.9, top_p=0.75, top_k=4096, seed=3)
    cases = list(CASES) * 2
    params = [greedy()] * len(CASES) + [sampled] * len(CASES)

    def tokens(llm):
        seqs = llm.engine.prepare_many([request(c) for c in cases], params)
        return [o.token_ids for o in llm.engine.run(seqs)]

    graphs = glmrt.LLM(str(checkpoint), dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3)
    assert graphs.engine.backend == "triton" and graphs.engine.runner.graphs is not None
    with_graphs = tokens(graphs)
    del graphs
    eager = glmrt.LLM(str(checkpoint), dtype="bfloat16", max_model_len=2048, kv_cache_tokens=16384,
                      enforce_eager=True, async_scheduling=False)
    assert tokens(eager) == with_graphs
    del eager
    fp32 = glmrt.LLM(str(checkpoint), dtype="float32", max_model_len=2048, gpu_memory_utilization=0.3)
    hf_model = GlmImageForConditionalGeneration.from_pretrained(
        checkpoint / "vision_language_encoder", dtype=torch.float32).to("cuda").eval()
    hf_processor = AutoProcessor.from_pretrained(checkpoint / "processor")
    for case in CASES:
        inputs = {k: v.to("cuda") for k, v in hf_inputs(hf_processor, case).items()}
        prompt, names, height, width = CASES[case]
        [out] = fp32.generate_image_tokens(prompt, height, width, images=[CONDITIONS[n] for n in names],
                                           sampling_params=greedy())
        assert out.token_ids == hf_generate(hf_model, inputs, do_sample=False)

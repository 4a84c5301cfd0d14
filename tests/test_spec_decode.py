"""Speculative decoding with the MTP layer: loading, the drafter against a plain-PyTorch reference
built on transformers' decoder layer (tests/mtp_reference.py), lossless greedy and sampled
verification, acceptance with oracle, random and trained drafters, and the statistics.

Random weights accept almost no draft, which exercises rejection; an oracle drafter (the known
greedy continuation) exercises full acceptance; a fixture trains the tiny checkpoint's MTP layer
on the model's own greedy outputs to show acceptance the way the real checkpoint has it.
"""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmrt
from glmrt.config import ModelConfig
from glmrt.engine.engine import LLMEngine
from glmrt.loader import NoMtpLayerError, load_checkpoint
from glmrt.model.glm_ocr import GlmOcrModel
from glmrt.model.ops import make_ops
from glmrt.model.positions import mrope_positions
from glmrt.model.text import AttentionMetadata
from glmrt.engine.runner import allocate_kv_cache
from glmrt_testing.engine_checks import OracleDrafts
from glmrt_testing.helpers import IMAGES, chi_square_passes, hf_greedy, hf_inputs
from glmrt_testing.mtp_reference import MtpReference

IMAGE = 59280


def make_engine(path, backend="torch", **options):
    return LLMEngine(str(path), device="cpu", dtype="float32", backend=backend, **options)


def hf_states(hf_model, inputs):
    """transformers' forward over `inputs` -> (input ids [T], inputs_embeds [T, H] with the image
    embeddings, position ids [3, T], final-normed hidden states [T, H])."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"][0]
        pos = kwargs["position_ids"]
        if pos is None:  # text only: plain positions on all three rows
            pos = torch.arange(kwargs["inputs_embeds"].shape[1]).expand(3, 1, -1)
        seen["positions"] = (pos[1:] if pos.shape[0] == 4 else pos)[:, 0]

    handle = hf_model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            hidden = hf_model.model(**inputs).last_hidden_state[0]
    finally:
        handle.remove()
    return inputs["input_ids"][0], seen["embeds"], seen["positions"], hidden


def next_embeds(ref, ids, embeds):
    """Row i: the MTP's embedding of token i + 1 (the target's own for image tokens) -> [T - 1, H]."""
    nxt = ids[1:]
    return torch.where((nxt == IMAGE)[:, None], embeds[1:], ref.embed(nxt))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, hf_model):
    return MtpReference(hf_model.config.text_config, load_file(tiny_checkpoint / "model.safetensors")).eval()


# ------------------------------------------------------------------------------------ loading


def test_loads_the_mtp_layer_and_refuses_a_checkpoint_without_one(tiny_checkpoint, tmp_path):
    config = ModelConfig.from_pretrained(tiny_checkpoint)
    ckpt = load_checkpoint(tiny_checkpoint, config, torch.device("cpu"), torch.float32, load_mtp=True)
    mtp = [n for n in ckpt.weights if n.startswith("model.language_model.layers.2.")]
    assert len(mtp) == 16 and "model.language_model.layers.2.shared_head.head.weight" in mtp
    stripped = tmp_path / "fine-tune"
    shutil.copytree(tiny_checkpoint, stripped)
    weights = load_file(stripped / "model.safetensors")
    save_file({n: t for n, t in weights.items() if ".layers.2." not in n}, stripped / "model.safetensors")
    assert make_engine(stripped).generate([{"prompt": "x"}], [glmrt.SamplingParams(max_tokens=2)])[0].token_ids
    with pytest.raises(NoMtpLayerError, match="has no MTP layer .* run without speculation"):
        make_engine(stripped, num_speculative_tokens=2)


def test_mtp_copies_equal_to_the_main_embedding_and_head_are_shared(tiny_checkpoint, tmp_path):
    path = tmp_path / "shared-copies"
    shutil.copytree(tiny_checkpoint, path)
    weights = load_file(path / "model.safetensors")
    weights["model.language_model.layers.2.embed_tokens.weight"] = weights["model.language_model.embed_tokens.weight"].clone()
    del weights["model.language_model.layers.2.shared_head.head.weight"]  # absent: the main lm_head stands in
    save_file(weights, path / "model.safetensors")
    config = ModelConfig.from_pretrained(path)
    model = GlmOcrModel.from_pretrained(path, config, make_ops("torch"), torch.device("cpu"), torch.float32, load_mtp=True)
    assert model.mtp.embed_tokens is model.text.embed_tokens and model.mtp.head is model.text.lm_head
    own = GlmOcrModel.from_pretrained(tiny_checkpoint, config, make_ops("torch"), torch.device("cpu"), torch.float32,
                                      load_mtp=True)
    assert own.mtp.embed_tokens is not own.text.embed_tokens and own.mtp.head is not own.text.lm_head


@pytest.mark.parametrize("k", [0, 9, True, "2"])
def test_bad_num_speculative_tokens_is_named(tiny_checkpoint, k):
    if k == 0:
        assert make_engine(tiny_checkpoint, num_speculative_tokens=0).runner.spec is None
        return
    with pytest.raises(ValueError, match="num_speculative_tokens must be an int in"):
        make_engine(tiny_checkpoint, num_speculative_tokens=k)


# ---------------------------------------------------------------------------- the MTP forward


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mtp_prefill_matches_the_reference(tiny_checkpoint, hf_model, hf_processor, reference, backend):
    """The MTP layer over a prompt with two images (varlen prefill, image rows taking the target's
    image embeddings) against the reference, fed transformers' own hidden states."""
    inputs = hf_inputs(hf_processor, [IMAGES["wide"], IMAGES["small"]], "Text Recognition:")
    ids, embeds, positions, hidden = hf_states(hf_model, inputs)
    with torch.no_grad():
        theirs, _ = reference(next_embeds(reference, ids, embeds), hidden[:-1], positions[:, :-1])
    config = ModelConfig.from_pretrained(tiny_checkpoint)
    model = GlmOcrModel.from_pretrained(tiny_checkpoint, config, make_ops(backend), torch.device("cpu"), torch.float32,
                                        load_mtp=True)
    t = ids.shape[0] - 1
    image_mask = ids[1:] == IMAGE
    mtp_embeds = model.embed(ids[1:], embeds[ids == IMAGE], image_mask, table=model.mtp.embed_tokens)
    [cache] = allocate_kv_cache(model, -(-t // 16), 16, num_layers=1)
    attn = AttentionMetadata(slot_mapping=torch.arange(t), cu_seqlens=torch.tensor([0, t], dtype=torch.int32), max_seqlen=t)
    normed, _ = model.mtp.forward(mtp_embeds, hidden[:-1], positions[:, :-1], attn, cache)
    ours = model.mtp.compute_logits(normed)
    assert (ours - theirs).abs().max() / theirs.abs().max() <= 1e-4


def record_drafts(engine):
    """Wrap the engine's drafter: -> a list filled with (context lengths [B], drafts [B, k]) per step."""
    spec, calls = engine.runner.spec, []
    propose = spec.propose

    def recording(bs):
        context = spec.batch.context_lens[:bs].clone()
        drafts = propose(bs)
        calls.append((context, drafts.clone()))
        return drafts

    spec.propose = recording
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_drafts_are_the_reference_chain(tiny_checkpoint, hf_model, hf_processor, reference, backend):
    """Every draft of every step equals the reference's greedy chain from that point: the MTP layer
    run over the known tokens with transformers' hidden states, then fed its own states."""
    k, images, prompt = 3, [IMAGES["small"]], "Text Recognition:"
    engine = make_engine(tiny_checkpoint, backend, num_speculative_tokens=k)
    calls = record_drafts(engine)
    # fewer steps in the interpreter: each step's drafts are checked all the same (at least 3 steps)
    max_tokens = 12 if backend == "torch" else 6
    [out] = engine.generate([{"images": images, "prompt": prompt}], [glmrt.SamplingParams(max_tokens=max_tokens)])
    inputs = hf_inputs(hf_processor, images, prompt)
    full = torch.tensor(out.prompt_token_ids + out.token_ids)[None]
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    inputs = {**inputs, "input_ids": full, "attention_mask": torch.ones_like(full),
              "mm_token_type_ids": (full == IMAGE).long()}
    ids, embeds, positions, hidden = hf_states(hf_model, inputs)
    assert torch.equal(positions, mrope_positions(full[0].tolist(), grids, IMAGE, 2)[0])
    with torch.no_grad():
        rows = next_embeds(reference, ids, embeds)
        checked = 0
        for context, drafts in calls:
            n = int(context[0])
            if n >= full.shape[1]:  # launched after the request's last token: its inputs were dropped
                continue
            checked += 1
            e, h, pos, chain = rows[:n], hidden[:n], positions[:, :n], []
            for _ in range(k):
                logits, y = reference(e, h, pos)
                chain.append(int(logits[-1].argmax()))
                e = torch.cat([e, reference.embed.weight[chain[-1]][None]])
                h, pos = torch.cat([h, y[-1:]]), torch.cat([pos, pos[:, -1:] + 1], dim=1)
            assert drafts[0].tolist() == chain, f"step at context {n}"
    assert checked >= 3


def engine_tokens(path, requests, params, drafter=None, **options):
    """-> (tokens, finish reasons, texts) of each request, and the engine (drafter: installs one on it)."""
    engine = make_engine(path, **options)
    if drafter is not None:
        drafter(engine)
    outs = engine.generate(requests, params)
    return [o.token_ids for o in outs], [o.finish_reason for o in outs], [o.text for o in outs], engine


# -------------------------------------------------------------------------- lossless greedy

REQUESTS = [
    {"images": [IMAGES["small"]], "prompt": "Text Recognition:"},
    {"prompt": "a text-only prompt"},
    {"images": [IMAGES["wide"], IMAGES["page"]], "prompt": "Table Recognition:"},
    {"images": [IMAGES["page"]], "prompt": "Formula Recognition:"},
]


def greedy_params():
    """Penalties, stop tokens, stop strings and max_tokens, one request each."""
    return [glmrt.SamplingParams(max_tokens=24, repetition_penalty=1.3),
            glmrt.SamplingParams(max_tokens=19),
            glmrt.SamplingParams(max_tokens=30, repetition_penalty=1.1),
            glmrt.SamplingParams(max_tokens=26)]


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    """Plain greedy decoding of REQUESTS (which test_parity and test_engine tie to transformers)."""
    return engine_tokens(tiny_checkpoint, REQUESTS, greedy_params())[:3]


def test_plain_greedy_of_the_requests_is_transformers(hf_model, hf_processor, plain):
    for request, tokens, params in zip(REQUESTS, plain[0], greedy_params()):
        inputs = hf_inputs(hf_processor, request.get("images", []), request["prompt"])
        with torch.no_grad():
            out = hf_model.generate(**inputs, max_new_tokens=params.max_tokens, do_sample=False,
                                    repetition_penalty=params.repetition_penalty)
        assert tokens == out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("k,options", [
    (1, {}), (3, {}), (4, {"async_scheduling": False}),
    (2, {"kv_cache_tokens": 320, "max_model_len": 256}),  # preemption
    (3, {"speculative_max_batch": 2}),  # plain steps while more than 2 run
])
def test_greedy_with_speculation_is_token_identical(tiny_checkpoint, plain, k, options):
    tokens, reasons, texts, engine = engine_tokens(tiny_checkpoint, REQUESTS, greedy_params(),
                                                   num_speculative_tokens=k, **options)
    assert (tokens, reasons, texts) == plain
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.spec_stats.num_drafts > 0
    if "kv_cache_tokens" in options:
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("backend", ["triton"])
def test_greedy_with_speculation_on_the_triton_backend(tiny_checkpoint, plain, backend):
    # Shorter outputs than greedy_params' (each step is a verify and k draft passes in the
    # interpreter): an image request with a penalty and a text-only one, neither a multiple of k + 1.
    params = [glmrt.SamplingParams(max_tokens=10, repetition_penalty=1.3), glmrt.SamplingParams(max_tokens=7)]
    expected = engine_tokens(tiny_checkpoint, REQUESTS[:2], params)[:3]  # plain greedy, torch backend
    assert [t == full[:len(t)] for t, full in zip(expected[0], plain[0])] == [True, True]
    tokens, reasons, texts, _ = engine_tokens(tiny_checkpoint, REQUESTS[:2], params,
                                              backend=backend, num_speculative_tokens=3)
    assert (tokens, reasons, texts) == expected


def test_stop_tokens_and_strings_end_a_speculative_step_where_plain_decoding_ends(tiny_checkpoint, plain):
    """A stop token or string inside a run of accepted drafts: the tokens after it are dropped,
    as plain decoding never produces them (the oracle drafter makes every draft right)."""
    base = plain[0][0]
    text = make_engine(tiny_checkpoint).processor.decode(base, skip_special_tokens=True)
    stop_str = text[len(text) // 2: len(text) // 2 + 2]
    params = [glmrt.SamplingParams(max_tokens=24, repetition_penalty=1.3, stop_token_ids=[base[9]]),
              glmrt.SamplingParams(max_tokens=24, repetition_penalty=1.3, stop=[stop_str]),
              glmrt.SamplingParams(max_tokens=24, repetition_penalty=1.3, stop=[stop_str], include_stop_str_in_output=True)]
    requests = [REQUESTS[0]] * 3
    expected = engine_tokens(tiny_checkpoint, requests, params)[:3]
    assert expected[1][1] == "stop" and expected[0][0][-1] == base[9] and len(expected[1][0]) < 24
    assert engine_tokens(tiny_checkpoint, requests, params, num_speculative_tokens=3)[:3] == expected
    oracle = engine_tokens(tiny_checkpoint, requests, params, drafter=lambda e: oracle_drafter(e, [base] * 3),
                           num_speculative_tokens=3)
    assert oracle[:3] == expected and oracle[3].spec_stats.num_accepted_tokens > 0


def oracle_drafter(engine, outputs, corrupt: float = 0.0, seed: int = 0) -> OracleDrafts:
    """Drafts the known continuation of each running request (outputs[i] for request req-i), with
    each draft replaced by a random token with probability `corrupt`."""
    gen = torch.Generator().manual_seed(seed)

    def replace(seq, n, known):
        noise = torch.randint(0, 59392, (len(known),), generator=gen)
        return torch.where(torch.rand(len(known), generator=gen) < corrupt, noise, torch.tensor(known)).tolist()

    return OracleDrafts(engine, lambda seq: outputs[int(seq.request_id.split("-")[1])], replace)


@pytest.mark.parametrize("corrupt", [0.0, 0.3, 1.0])
def test_oracle_and_random_drafts_accept_what_they_should(tiny_checkpoint, plain, corrupt):
    """Right drafts are all accepted (a step yields k + 1 tokens, so steps fall by that factor);
    wrong ones are all rejected; either way the tokens are plain greedy's."""
    k = 3
    tokens, reasons, texts, engine = engine_tokens(
        tiny_checkpoint, REQUESTS, greedy_params(), drafter=lambda e: oracle_drafter(e, plain[0], corrupt),
        num_speculative_tokens=k)
    assert (tokens, reasons, texts) == plain
    stats = engine.spec_stats
    rate = stats.num_accepted_tokens / stats.num_draft_tokens
    if corrupt == 0.0:
        assert rate > 0.85  # short of 1 only where a request ends inside a step
        assert stats.accepted_per_position[-1] > 0.8 * stats.num_drafts
    elif corrupt == 1.0:
        assert stats.num_accepted_tokens == 0 and stats.mean_accepted_length == 1.0
    else:
        assert 0 < rate < 0.85 and stats.accepted_per_position == sorted(stats.accepted_per_position, reverse=True)


# ------------------------------------------------------------------------- lossless sampling


def test_verification_samples_exactly_the_target_distribution():
    """Sampler.verify over many rows (one seed each) with fixed target logits and drafts: the first
    token follows p0; after an accepted draft the next follows p1 (whose penalty counts the
    draft); temperature, top-k and top-p shape p; greedy rows give the penalised argmax chain."""
    from glmrt.engine.sampler import Sampler, SamplingState
    from glmrt.kernels.sampling import top_k_top_p_filter_ref
    from glmrt.model.ops import TorchOps

    n, vocab, k = 20000, 12, 2
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(k + 1, vocab, generator=gen) * 1.5
    drafts = torch.tensor([[int(base[0].argmax()), int(base[1].argsort()[-2])]]).expand(n, k)

    def state(rows, temperature):
        st = SamplingState(rows, vocab, torch.device("cpu"))
        st.seeds.copy_(torch.arange(rows) * 7919 + 11)
        st.temperature.fill_(temperature)
        st.top_k.fill_(8)
        st.top_p.fill_(0.95)
        st.penalty.fill_(1.5)
        st.presence[:, 3] = True
        return st

    def penalised(j):  # the logits at position j, penalised for token 3 and drafts[:j]
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[3] = True
        seen[drafts[0, :j]] = True
        return torch.where(seen, torch.where(base[j] < 0, base[j] * 1.5, base[j] / 1.5), base[j])

    def target(j):
        return top_k_top_p_filter_ref(penalised(j)[None] / 0.8, torch.tensor([8]), torch.tensor([0.95]))[0].softmax(-1)

    st = state(n, 0.8)
    out = Sampler(TorchOps(), st).verify(base.repeat(n, 1), drafts, slice(0, n), do_sample=True)
    count, tokens = out[:, 0], out[:, 1:]
    assert chi_square_passes(torch.bincount(tokens[:, 0], minlength=vocab), target(0))
    after = count >= 2  # the first draft was accepted: token 1 is the second position's draw
    assert torch.equal(tokens[after, 0], drafts[after, 0])
    assert after.sum() > 1000 and chi_square_passes(torch.bincount(tokens[after, 1], minlength=vocab), target(1))
    assert torch.equal(st.counters, count.long())
    assert st.presence[torch.arange(n), tokens[:, 0]].all()

    greedy = Sampler(TorchOps(), state(1, 0.0)).verify(base, drafts[:1], slice(0, 1), do_sample=False)
    chain = []
    for j in range(k + 1):
        chain.append(int(penalised(j).argmax()))
        if j == k or chain[-1] != drafts[0, j]:
            break
    assert greedy[0, 0] == len(chain) and greedy[0, 1: 1 + len(chain)].tolist() == chain


def test_verification_under_token_masks_rejects_the_drafts_a_mask_refuses():
    """Sampler.verify with a structured-output mask per verified position: a draft its position's
    mask refuses is rejected even when it is the unmasked argmax, and the token drawn there
    follows the masked distribution (greedy: the masked argmax)."""
    from glmrt.engine.sampler import Sampler, SamplingState
    from glmrt.kernels.sampling import apply_token_bitmask_ref
    from glmrt.model.ops import TorchOps

    n, vocab, k = 20000, 45, 2  # two mask words, the second partly past the vocabulary
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(k + 1, vocab, generator=gen) * 1.5
    drafts = torch.tensor([[int(base[0].argmax()), int(base[1].argmax())]])
    allowed = torch.ones(k + 1, vocab, dtype=torch.bool)
    allowed[1, drafts[0, 1]] = False  # the second draft, position 1's argmax, is refused there
    allowed[1, base[1].argsort()[-4:-2]] = False
    allowed[2, :30] = False
    words = torch.zeros(k + 1, 2, dtype=torch.int64)
    for j in range(k + 1):
        for v in allowed[j].nonzero()[:, 0].tolist():
            words[j, v // 32] |= 1 << (v % 32)
    masks = torch.where(words >= 2**31, words - 2**32, words).int()  # int32 bit patterns
    masked = apply_token_bitmask_ref(base, masks)

    def state(rows, temperature):
        st = SamplingState(rows, vocab, torch.device("cpu"))
        st.seeds.copy_(torch.arange(rows) * 7919 + 5)
        st.temperature.fill_(temperature)
        return st

    greedy = Sampler(TorchOps(), state(1, 0.0))
    out = greedy.verify(base, drafts, slice(0, 1), do_sample=False, token_mask=masks)
    assert out[0, :3].tolist() == [2, drafts[0, 0], int(masked[1].argmax())]
    unmasked = Sampler(TorchOps(), state(1, 0.0)).verify(base, drafts, slice(0, 1), do_sample=False)
    assert unmasked[0, 0] == 3  # the mask is what rejected the second draft

    rows = drafts.expand(n, k)
    out = Sampler(TorchOps(), state(n, 1.0)).verify(base.repeat(n, 1), rows, slice(0, n), do_sample=True,
                                                     token_mask=masks.repeat(n, 1))
    count, tokens = out[:, 0], out[:, 1:]
    assert count.max() <= 2
    assert chi_square_passes(torch.bincount(tokens[:, 0], minlength=vocab), masked[0].softmax(-1))
    after = count == 2  # the first draft was accepted: token 1 is position 1's masked draw
    assert after.sum() > 1000 and allowed[1, tokens[after, 1]].all()
    assert chi_square_passes(torch.bincount(tokens[after, 1], minlength=vocab), masked[1].softmax(-1))


def test_sampled_requests_follow_the_target_distribution(tiny_checkpoint, hf_model, hf_processor):
    """The engine end to end: the token drawn by the first speculative step (drafts from an oracle
    of greedy tokens, so some are accepted and some rejected), against transformers' distribution
    given the first token."""
    request = {"prompt": "a text-only prompt"}
    greedy = engine_tokens(tiny_checkpoint, [request], [glmrt.SamplingParams(max_tokens=4)])[0][0]
    n = 256
    params = [glmrt.SamplingParams(max_tokens=2, temperature=1.0, top_k=4, seed=s) for s in range(n)]
    tokens, _, _, engine = engine_tokens(tiny_checkpoint, [request] * n, params, max_num_seqs=64,
                                         drafter=lambda e: oracle_drafter(e, [greedy] * n), num_speculative_tokens=2)
    assert engine.spec_stats.num_accepted_tokens > 0
    firsts = torch.tensor([t[0] for t in tokens])
    first = int(firsts.mode().values)
    seconds = torch.tensor([t[1] for t in tokens if t[0] == first])
    inputs = hf_inputs(hf_processor, [], request["prompt"])
    ids = torch.cat([inputs["input_ids"], torch.tensor([[first]])], dim=1)
    with torch.no_grad():
        logits = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
    top = logits.topk(4)
    probs = torch.zeros_like(logits).index_put_((top.indices,), top.values.softmax(-1))
    assert len(seconds) > 50
    assert chi_square_passes(torch.bincount(seconds, minlength=logits.shape[0]), probs)


# ------------------------------------------------------------------------- a trained drafter

TRAIN_CASES = [([IMAGES["small"]], "Text Recognition:"), ([], "a text-only prompt"), ([], "Describe nothing: 你好")]
TRAIN_TOKENS = 40


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, hf_model, hf_processor, reference, tmp_path_factory):
    """The tiny checkpoint with its MTP layer trained (60 Adam steps, its embedding and head
    frozen) to predict token i + 2 of the model's own greedy outputs, from the target's hidden
    states and, as a chained draft step has it, from its own previous output state -> (path,
    greedy outputs)."""
    data, outputs = [], []
    for images, prompt in TRAIN_CASES:
        prompt_ids, out = hf_greedy(hf_model, hf_processor, images, prompt, TRAIN_TOKENS)
        full = torch.tensor(prompt_ids + out)[None]
        inputs = {**hf_inputs(hf_processor, images, prompt), "input_ids": full, "attention_mask": torch.ones_like(full),
                  "mm_token_type_ids": (full == IMAGE).long()}
        data.append(hf_states(hf_model, inputs))
        outputs.append(out)
    model = MtpReference(hf_model.config.text_config, load_file(tiny_checkpoint / "model.safetensors")).train()
    model.head.weight.requires_grad_(False)
    model.embed.weight.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):
        optimizer.zero_grad()
        for ids, embeds, positions, hidden in data:
            rows, states, labels = next_embeds(model, ids, embeds), hidden[:-1], ids[2:]
            for _ in range(3):  # depth 1 from the target's states, then as chained drafts see it
                logits, y = model(rows, states, positions[:, :-1])
                torch.nn.functional.cross_entropy(logits[:-1], labels).backward()
                states = torch.cat([states[:1], y[:-1].detach()])  # row i takes the draft state of row i - 1
        optimizer.step()
    path = tmp_path_factory.mktemp("tiny-glm-ocr-trained-mtp")
    shutil.copytree(tiny_checkpoint, path, dirs_exist_ok=True)
    weights = load_file(tiny_checkpoint / "model.safetensors")
    weights.update(model.checkpoint_weights())
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path, outputs


@pytest.mark.parametrize("k", [1, 3])
def test_a_trained_drafter_is_accepted_and_cuts_the_steps(trained, k):
    """With the trained MTP layer most drafts are accepted, so a request needs far fewer decode
    steps than tokens, and the tokens are still plain greedy's (transformers')."""
    path, outputs = trained
    requests = [{"images": images, "prompt": prompt} for images, prompt in TRAIN_CASES]
    params = [glmrt.SamplingParams(max_tokens=TRAIN_TOKENS)] * len(requests)
    tokens, _, _, engine = engine_tokens(path, requests, params, num_speculative_tokens=k)
    assert tokens == outputs
    stats = engine.spec_stats.as_dict()
    assert stats["acceptance_rate_per_position"][0] > 0.8
    assert stats["mean_accepted_length"] > 1 + 0.6 * k
    decode_tokens = sum(len(t) - 1 for t in tokens)  # the first token of each comes from the prefill
    assert engine.spec_stats.num_drafts < decode_tokens / (1 + 0.6 * k)


def test_server_speculates_with_vllms_flag_and_reports_acceptance(trained):
    """`glmrt serve --speculative-config '{"method": "mtp", ...}'` (vLLM's flag): the answer is plain
    greedy's, and /metrics carries vLLM's speculative-decoding counters."""
    import httpx

    from glmrt_testing.server_process import ServerProcess

    path, _ = trained
    images, prompt = TRAIN_CASES[1]
    expected = engine_tokens(path, [{"prompt": prompt}], [glmrt.SamplingParams(max_tokens=TRAIN_TOKENS)])
    config = '{"method": "mtp", "num_speculative_tokens": 2}'
    with ServerProcess(path, "--speculative-config", config, "--max-model-len", "512") as server:
        payload = {"model": "glm-ocr", "max_tokens": TRAIN_TOKENS, "temperature": 0, "repetition_penalty": 1.0,
                   "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]}
        response = httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected[2][0]
        metrics = server.metrics()
    drafts = metrics["glmrt:spec_decode_num_drafts_total"]
    assert metrics["glmrt:spec_decode_num_draft_tokens_total"] == 2 * drafts > 0
    assert metrics['glmrt:spec_decode_num_accepted_tokens_per_pos_total{position="0"}'] > 0.8 * drafts
    assert metrics["glmrt:spec_decode_num_accepted_tokens_total"] == sum(
        metrics[f'glmrt:spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}'] for i in range(2))


@pytest.mark.parametrize("flag,message", [
    ('{"method": "eagle", "num_speculative_tokens": 2}', '"method" one of'),
    ('{"method": "ngram", "num_speculative_tokens": 2, "draft_model": "x"}', "unsupported fields ['draft_model']"),
    ('{"num_speculative_tokens": "x"}', "num_speculative_tokens must be an int"),
    ("{not json", "not JSON"),
])
def test_cli_refuses_a_bad_speculative_config(flag, message, capsys):
    from glmrt.cli import main

    assert main(["serve", "some/model", "--speculative-config", flag]) == 2
    assert message in capsys.readouterr().err


def test_one_token_prompts_have_nothing_to_prefill_in_the_mtp_layer(tiny_checkpoint):
    requests = [{"prompt_token_ids": [59248]}, {"prompt": "hi"}, {"prompt_token_ids": [5]}]
    params = [glmrt.SamplingParams(max_tokens=6)] * 3
    assert engine_tokens(tiny_checkpoint, requests, params, num_speculative_tokens=2)[:3] == \
        engine_tokens(tiny_checkpoint, requests, params)[:3]

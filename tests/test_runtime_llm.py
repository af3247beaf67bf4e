"""The torch-free LLM runtime: parity with transformers' generate, in-place cache, prefix reuse, sampling."""

import threading

import numpy as np
import pytest
import torch

from omniforge.errors import CachePoolExhaustedError, ConfigError, ContextLengthError, InputError
from omniforge.model.loader import load_llm
from omniforge.pipeline.model_config import load_model_config
from omniforge.runtime import llm as llm_module
from omniforge.runtime.kv_cache import SlotRange
from omniforge.runtime.llm import Chat, LlmRuntime
from omniforge.runtime.sampling import GenerationConfig, apply_repetition_penalty, select_token

PROMPTS = [
    "Describe the image in one sentence.",
    "A dog runs",
    "Generate the sound of rain falling on a tin roof and then",
]
GREEDY64 = GenerationConfig(max_new_tokens=64)


@pytest.fixture(scope="module")
def runtime(default_build):
    return LlmRuntime(default_build, num_slots=4)


@pytest.fixture(scope="module")
def hf(default_model):
    """The LLM with the adapter text prompts run with (``auto``) merged, as PEFT merges it."""
    return load_llm(load_model_config(default_model), adapter="text")


def hf_greedy(hf, ids, n, eos):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers_generate_for_64_tokens(runtime, hf, prompt):
    result = runtime.generate(prompt, GREEDY64)
    ref = hf_greedy(hf, runtime.tokenizer.encode(prompt), 64, runtime.tokenizer.eos_id)
    assert result.token_ids == ref
    assert len(ref) == 64 and result.finish_reason == "length"


def test_greedy_equals_generate_on_a_user_llama_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from omniforge.export.exporter import export_pipeline
    from omniforge.model.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(400)
    folder = tmp_path / "user-llama"
    save_tokenizer(tok, folder)
    torch.manual_seed(7)
    conf = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=48,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=160,
        tie_word_embeddings=True,
        eos_token_id=tok.token_to_id("</s>"),
    )
    model = LlamaForCausalLM(conf).eval()
    model.save_pretrained(folder)
    export_pipeline(folder, tmp_path / "build", log=lambda _m: None)
    rt = LlmRuntime(tmp_path / "build", num_slots=2)
    for prompt in PROMPTS[:2]:
        ids = rt.tokenizer.encode(prompt)
        assert rt.generate(prompt, GREEDY64).token_ids == hf_greedy(model, ids, 64, conf.eos_token_id)


def test_batched_generation_equals_one_by_one(runtime):
    cfg = GenerationConfig(max_new_tokens=24)
    batch = runtime.generate_batch(PROMPTS, cfg)
    single = [runtime.generate(p, cfg) for p in PROMPTS]
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    assert [b.text for b in batch] == [s.text for s in single]


def test_decode_writes_only_the_new_tokens_kv_in_place(runtime):
    """Each decode step writes one row per layer into the same pool memory, whatever the context."""
    pool = runtime.pool
    addresses = [a.ctypes.data for a in (*pool.keys, *pool.values)]
    rows, _ = runtime.prepare(PROMPTS[2])
    slots = pool.allocate(1)
    try:
        binding = runtime.engine.bind(pool, slots)
        pairs = runtime.engine.contract.inplace
        assert len(pairs) == 2 * runtime.geometry.num_layers
        for j, (pair, ov) in enumerate(zip(pairs, pool.bindings(slots), strict=True)):
            arr = (pool.keys if j % 2 == 0 else pool.values)[j // 2]
            assert pair.input.endswith(f"{j // 2}.{('key', 'value')[j % 2]}")  # layer-major key/value
            assert ov.data_ptr() == arr[slots.start :].ctypes.data  # the graph reads and writes the pool
        binding.step(rows[None])
        exchanged = []
        for context in (len(rows), 150):
            pool.lengths[slots.start] = context
            before = [a[slots.start].copy() for a in (*pool.keys, *pool.values)]
            binding.step(rows[None, :1])
            after = [a[slots.start] for a in (*pool.keys, *pool.values)]
            for b, a in zip(before, after, strict=True):
                changed = np.nonzero(np.any(b != a, axis=(0, 2)))[0]
                assert changed.tolist() == [context]  # only the new token's row
            outs = binding.io.get_outputs()
            exchanged.append(rows[:1].nbytes + sum(o.numpy().nbytes for o in outs[:2]))
        assert exchanged[0] == exchanged[1]  # bytes crossing the session boundary do not grow with context
        assert [a.ctypes.data for a in (*pool.keys, *pool.values)] == addresses
    finally:
        pool.release(slots)


def test_a_long_prompt_prefilled_in_chunks_equals_one_run(runtime, hf, monkeypatch):
    """A prompt longer than the prefill chunk runs in chunks, each attending to the rows before it
    (bounding the attention arena): the same greedy tokens as one whole-prompt run and transformers."""
    prompt = PROMPTS[2]
    whole = runtime.generate(prompt, GenerationConfig(max_new_tokens=16))
    monkeypatch.setattr(llm_module, "PREFILL_CHUNK", 3)
    chunked = runtime.generate(prompt, GenerationConfig(max_new_tokens=16))
    assert len(runtime.tokenizer.encode(prompt)) > 3 * 3
    assert (
        chunked.token_ids
        == whole.token_ids
        == hf_greedy(hf, runtime.tokenizer.encode(prompt), 16, runtime.tokenizer.eos_id)
    )


def test_prefix_reuse_skips_the_shared_prefix_and_keeps_results(default_build):
    cfg = GenerationConfig(max_new_tokens=8)
    cached = LlmRuntime(default_build, num_slots=3, prefix_cache_entries=2, block_size=8)
    fresh = LlmRuntime(default_build, num_slots=3, prefix_cache_entries=0)
    image = (
        np.random.default_rng(0).standard_normal((1, cached.geometry.hidden_size)).astype(np.float32) * 0.05
    )
    chat, plain = Chat(cached, cfg), Chat(fresh, cfg)
    first = "A picture of a small red boat resting on a quiet lake at sunrise. <image> What is in this photo?"
    r1, p1 = chat.send(first, media={"image": [image]}), plain.send(first, media={"image": [image]})
    r2, p2 = (
        chat.send(" Describe the image in one sentence."),
        plain.send(" Describe the image in one sentence."),
    )
    assert r1.reused_prefix_tokens == 0 and p2.reused_prefix_tokens == 0
    assert r2.reused_prefix_tokens >= r1.prompt_tokens - 8  # all full blocks of turn 1 were reused
    assert (r1.token_ids, r2.token_ids) == (p1.token_ids, p2.token_ids)


def test_signal_token_hidden_states_match_transformers(runtime, hf):
    cfg = GenerationConfig(max_new_tokens=24)
    for prompt in [*PROMPTS, "Describe the image", "Create an image of a bowl of fruit"]:
        result = runtime.generate(prompt, cfg)
        if result.signal_hidden:
            break
    else:
        pytest.fail("no prompt produced a signal token")
    ids = runtime.tokenizer.encode(prompt) + result.token_ids
    with torch.no_grad():
        hidden = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].numpy()
    for modality, rows in result.signal_hidden.items():
        positions = [
            i
            for i, t in enumerate(ids)
            if runtime.signal_ids.get(t) == modality and i >= len(ids) - len(result.token_ids)
        ]
        np.testing.assert_allclose(rows, hidden[positions], atol=1e-4)


def test_sampling_is_seeded_and_top_k_1_is_greedy(runtime):
    s = GenerationConfig(max_new_tokens=16, temperature=0.9, top_p=0.9, repetition_penalty=1.1, seed=3)
    a, b = runtime.generate(PROMPTS[0], s), runtime.generate(PROMPTS[0], s)
    c = runtime.generate(PROMPTS[0], GenerationConfig(max_new_tokens=16, temperature=0.9, seed=4))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    k1 = runtime.generate(PROMPTS[0], GenerationConfig(max_new_tokens=16, temperature=1.5, top_k=1, seed=9))
    assert k1.token_ids == runtime.generate(PROMPTS[0], GenerationConfig(max_new_tokens=16)).token_ids


def test_top_p_never_leaves_the_nucleus_and_penalty_follows_hf():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(0)
    cfg = GenerationConfig(temperature=1.0, top_p=0.7)
    assert {select_token(logits, cfg, rng, np.array([], np.int64)) for _ in range(300)} == {0, 1}
    pen = apply_repetition_penalty(np.array([2.0, -2.0, 1.0], np.float32), np.array([0, 1]), 2.0)
    np.testing.assert_allclose(pen, [1.0, -4.0, 1.0])


def test_stop_tokens_stop_strings_and_streaming(runtime):
    ref = runtime.generate(PROMPTS[1], GenerationConfig(max_new_tokens=20))
    stop_tok = ref.token_ids[4]
    r = runtime.generate(PROMPTS[1], GenerationConfig(max_new_tokens=20, stop_token_ids=(stop_tok,)))
    assert (
        r.finish_reason == "stop"
        and r.token_ids[-1] == stop_tok
        and len(r.token_ids) == ref.token_ids.index(stop_tok) + 1
    )
    needle = ref.text[6:9]
    r = runtime.generate(PROMPTS[1], GenerationConfig(max_new_tokens=20, stop_strings=(needle,)))
    assert r.finish_reason == "stop_string" and r.text == ref.text[: ref.text.find(needle)]
    pieces = []
    r = runtime.generate(PROMPTS[1], GenerationConfig(max_new_tokens=20), on_text=pieces.append)
    assert "".join(pieces) == r.text == ref.text and len(pieces) > 1
    assert "".join(runtime.stream(PROMPTS[1], GenerationConfig(max_new_tokens=20))) == ref.text


def test_media_embeddings_replace_placeholders(runtime):
    h = runtime.geometry.hidden_size
    img = np.full((2, h), 0.5, np.float32)
    rows, ids = runtime.prepare("look <image> here", media={"image": [img]})
    pos = ids.index(runtime.tokenizer.token_id("<image>"))
    assert rows.shape == (len(ids) + 1, h)
    np.testing.assert_array_equal(rows[pos : pos + 2], img)
    with pytest.raises(InputError, match="fewer placeholders than media"):
        runtime.prepare("no placeholder", media={"image": [img]})
    with pytest.raises(InputError, match="unknown modality 'smell'"):
        runtime.prepare("x <image>", media={"smell": [img]})
    with pytest.raises(InputError, match=r"shape \(n, 64\)"):
        runtime.prepare("x <image>", media={"image": [np.zeros((2, 3), np.float32)]})


def test_bad_requests_fail_alone(runtime):
    with pytest.raises(ContextLengthError, match="context holds 256"):
        runtime.generate(list(range(5, 5 + 256)), GenerationConfig(max_new_tokens=2))
    with pytest.raises(InputError, match=r"token ids must lie in \[0, "):
        runtime.generate([1, 2, 100000])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    runtime.prefix_cache.clear()
    taken = runtime.pool.allocate(runtime.pool.num_slots)
    try:
        with pytest.raises(CachePoolExhaustedError, match="no 1 free adjacent slot"):
            runtime.generate(PROMPTS[0], GenerationConfig(max_new_tokens=2))
    finally:
        runtime.pool.release(taken)
    assert runtime.generate(PROMPTS[0], GenerationConfig(max_new_tokens=2)).new_tokens == 2


def test_long_generation_stops_at_the_context(default_build):
    rt = LlmRuntime(default_build, num_slots=1, max_context=40, prefix_cache_entries=0)
    r = rt.generate(PROMPTS[0], GenerationConfig(max_new_tokens=200, stop_token_ids=()))
    assert r.finish_reason == "length" and r.prompt_tokens + r.new_tokens == 41
    assert rt.pool.slots_in_use == 0


def test_threads_share_engines_and_pool(default_build):
    rt = LlmRuntime(default_build, num_slots=4, prefix_cache_entries=1)
    cfg = GenerationConfig(max_new_tokens=12)
    serial = {p: rt.generate(p, cfg).token_ids for p in PROMPTS}
    results, errors = [], []

    def work(p):
        try:
            for _ in range(3):
                results.append((p, rt.generate(p, cfg).token_ids))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(ids == serial[p] for p, ids in results) and len(results) == 9
    assert rt.pool.slots_in_use == len(rt.prefix_cache)


def test_pool_allocates_adjacent_slots_and_reports_memory(runtime):
    pool = runtime.pool
    g = runtime.geometry
    assert (
        pool.nbytes == 2 * g.num_layers * pool.num_slots * g.num_kv_heads * pool.max_context * g.head_dim * 4
    )
    runtime.prefix_cache.clear()
    a = pool.allocate(2)
    b = pool.allocate(1)
    assert (a, b) == (SlotRange(0, 2), SlotRange(2, 1))
    pool.release(a)
    c = pool.allocate(2)
    assert c == SlotRange(0, 2)
    pool.release(b)
    pool.release(c)
    assert pool.slots_in_use == 0

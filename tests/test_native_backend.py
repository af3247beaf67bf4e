# ruff: noqa: F811  (the native fixtures are imported from tests/test_native.py by name)
"""``LlmRuntime(backend="native")``: the Python runtime hands its decode loop to libomniforge
through ctypes. The same requests on both backends give the same tokens, text, stream pieces,
finish reasons and signal events (signal hidden states within float rounding), on the default
build and on a user's Llama folder built at fp32 and int4; requests the native core does not run
(media, adapters, chat turns) stay on the Python loop; a missing library is one sentence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_native import (  # noqa: F401  (fixtures)
    native_build,
    native_cache,
    ort_headers,
)

CONFIGS = [
    {"max_new_tokens": 64},
    {"max_new_tokens": 48, "temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 11},
    {"max_new_tokens": 48, "temperature": 0.7, "repetition_penalty": 1.3, "seed": 5},
]
PROMPTS = ["A dog runs in the park", "Show me a picture of a cat", "make a sound", [1, 5, 9, 3, 7]]


@pytest.fixture
def library(native_build: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    lib = native_build / "libomniforge.so"
    assert lib.is_file()
    monkeypatch.setenv("OMNIFORGE_NATIVE_LIBRARY", str(lib))
    return lib


def _pair(build: Path):
    from omniforge.runtime.llm import LlmRuntime

    py, nat = LlmRuntime(build, backend="python"), LlmRuntime(build, backend="native")
    assert (py.backend, nat.backend) == ("python", "native")
    return py, nat


def _same(a, b) -> None:
    assert b.token_ids == a.token_ids
    assert b.text == a.text
    assert b.finish_reason == a.finish_reason
    assert b.signals == a.signals
    assert b.prompt_tokens == a.prompt_tokens
    assert sorted(b.signal_hidden) == sorted(a.signal_hidden)
    for m, rows in a.signal_hidden.items():  # one teacher-forced pass vs step by step
        np.testing.assert_allclose(b.signal_hidden[m], rows, atol=1e-5, rtol=1e-5)


def test_default_build_same_requests_same_results(library: Path, default_build: Path) -> None:
    from omniforge.runtime.sampling import GenerationConfig

    py, nat = _pair(default_build)
    signals = 0
    for prompt in PROMPTS:
        for cfg in CONFIGS:
            config = GenerationConfig(**cfg)
            a = py.generate(prompt, config, adapter="none")
            pieces: list[str] = []
            b = nat.generate(prompt, config, adapter="none", on_text=pieces.append)
            _same(a, b)
            assert "".join(pieces) == a.text
            signals += len(a.signals)
    assert signals > 0  # the signal-hidden path was exercised
    stop = GenerationConfig(max_new_tokens=40, stop_strings=("a",), stop_token_ids=(5, 9))
    _same(py.generate("A dog", stop, adapter="none"), nat.generate("A dog", stop, adapter="none"))


def _with_protocol(build: Path, dest: Path, signal_position: str) -> Path:
    """A copy of ``build`` carrying a protocol whose signal tokens read ``signal_position``."""
    import json
    import shutil

    from omniforge.pipeline.manifest import collect_artifacts, load_manifest, write_manifest
    from omniforge.pipeline.protocol import PromptProtocol

    out = Path(shutil.copytree(build, dest))
    (out / "protocol.json").write_text(json.dumps(PromptProtocol(signal_position=signal_position).to_dict()))
    m = load_manifest(out, verify=False)
    m.files["protocol"] = "protocol.json"
    m.artifacts.update(collect_artifacts(out, ["protocol.json"]))
    write_manifest(out, m)
    return out


@pytest.mark.parametrize("position", ["predicting", "at_token"])
def test_signal_hidden_states_come_from_the_native_loop(
    library: Path, default_build: Path, tmp_path: Path, position: str
) -> None:
    """The native core keeps the hidden state each signal token hands on (the row that predicted
    it, or the row at it, as the build's protocol says), equal to the Python loop's, including a
    signal token generated last (fed once more only under 'at_token', when the context has room);
    a runtime whose requests all run natively never opens the Python loop's LLM session."""
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    build = _with_protocol(default_build, tmp_path / "b", position)
    py, nat = _pair(build)
    assert nat.signal_position == position
    cfg = GenerationConfig(max_new_tokens=48)
    found = None
    for prompt in PROMPTS:
        a = py.generate(prompt, cfg, adapter="none")
        _same(a, nat.generate(prompt, cfg, adapter="none"))
        if a.signals and found is None:
            found = (prompt, a)
    assert found is not None
    prompt, a = found
    k = a.signals[0].index  # end on a signal token: max_new_tokens, then a full context
    last = GenerationConfig(max_new_tokens=k + 1)
    _same(py.generate(prompt, last, adapter="none"), nat.generate(prompt, last, adapter="none"))
    n = a.prompt_tokens
    for ctx in (n + k + 1, n + k):  # feeding the signal token fills the context / no room for it
        p2 = LlmRuntime(build, max_context=ctx, backend="python")
        n2 = LlmRuntime(build, max_context=ctx, backend="native")
        x, y = p2.generate(prompt, last, adapter="none"), n2.generate(prompt, last, adapter="none")
        assert x.token_ids[-1] == a.token_ids[k]
        _same(x, y)
        assert n2._engines == {}
    assert nat._engines == {} and py._engines  # the native runtime never opened its own session
    # teacher forcing (a forced modality's signal tokens after the reply) runs natively too, at the
    # protocol's positions; another position takes the Python loop
    rows, _ = nat.prepare(prompt)
    ids = [t for t, m in nat.signal_ids.items() if m == "image"]
    want = py.hidden_after(rows, ids, predicting=position == "predicting")
    np.testing.assert_allclose(
        nat.hidden_after(rows, ids, predicting=position == "predicting"), want, atol=1e-5, rtol=1e-5
    )
    assert nat._engines == {}
    other = py.hidden_after(rows, ids, predicting=position != "predicting")
    np.testing.assert_allclose(
        nat.hidden_after(rows, ids, predicting=position != "predicting"), other, atol=1e-5, rtol=1e-5
    )
    assert nat._engines  # the Python loop's session, opened for it


def test_stream_and_cancellation(library: Path, default_build: Path) -> None:
    from omniforge.runtime.sampling import GenerationConfig

    py, nat = _pair(default_build)
    cfg = GenerationConfig(max_new_tokens=32, stop_token_ids=())
    want = list(py.stream("A dog runs", cfg, adapter="none"))
    assert "".join(nat.stream("A dog runs", cfg, adapter="none")) == "".join(want)
    it = nat.stream("A dog runs", cfg, adapter="none")
    next(it)
    it.close()  # cancels the request: its slot is free again for all four slots' worth of work

    def boom(_text: str) -> None:
        raise RuntimeError("client left")

    with pytest.raises(RuntimeError, match="client left"):
        nat.generate("A dog runs", cfg, adapter="none", on_text=boom)
    got = [nat.generate([1, 2, 3], cfg, adapter="none") for _ in range(nat.pool.num_slots + 1)]
    assert len({tuple(r.token_ids) for r in got}) == 1  # no slot was lost


def test_media_rows_run_natively_and_adapters_stay_on_python(
    library: Path, default_build: Path, tmp_path: Path
) -> None:
    """Prompts with media rows spliced in, and ready embeddings, run on the native core
    (``of_llm_generate_embeddings``) with the Python loop's results; a conversation whose turns
    carry an image reuses the earlier turns' KV natively as the Python loop does (the cache matches
    rows); a LoRA adapter stays on the Python loop. Bad rows are refused in one sentence."""
    from omniforge.errors import InputError
    from omniforge.runtime.sampling import GenerationConfig

    py, nat = _pair(default_build)
    cfg = GenerationConfig(max_new_tokens=24)
    rows, ids = nat.prepare("A dog runs")
    assert not nat._native_runs([rows], [ids], ["text"]) and nat._native_runs([rows], [ids], [None])
    emb = rows + 0.01  # ready embeddings, not the tokens' own rows
    _same(py.generate(emb, cfg, adapter="none"), nat.generate(emb, cfg, adapter="none"))
    h = nat.geometry.hidden_size
    image = np.random.default_rng(3).normal(0, 0.05, (2, h)).astype(np.float32)  # projected rows
    prompt = "Look at <image> and describe it"
    placeholder = py.build.pipeline.placeholders["image"]
    prompt = prompt.replace("<image>", placeholder)
    sampled = GenerationConfig(max_new_tokens=24, temperature=0.8, top_k=20, repetition_penalty=1.2, seed=4)
    for c in (cfg, sampled):
        x = py.generate(prompt, c, media={"image": [image]}, adapter="none")
        y = nat.generate(prompt, c, media={"image": [image]}, adapter="none")
        _same(x, y)
        assert x.prompt_tokens == len(py.tokenizer.encode(prompt)) + 1  # two rows for one placeholder
    assert nat._engines == {}  # no Python session was needed
    assert "table" not in vars(nat) and "table" in vars(py)  # nor the Python table: the native core's serves
    np.testing.assert_array_equal(nat.embed_ids(ids), py.embed_ids(ids))
    # a conversation over the same image: the second turn's prefix (text and media rows) is reused
    first = nat.prepare(prompt, {"image": [image]})
    long = (np.concatenate([first[0], first[0], first[0]]), first[1] * 3)
    for rt in (py, nat):
        rt.generate_rows([long[0]], [long[1]], cfg, adapters=[None])
    more = (np.concatenate([long[0], rows]), long[1] + ids)
    x, y = (rt.generate_rows([more[0]], [more[1]], cfg, adapters=[None])[0] for rt in (py, nat))
    _same(x, y)
    assert y.reused_prefix_tokens == x.reused_prefix_tokens > 0
    assert nat._engines == {}
    # the default model's adapters: the native core runs the base model only
    a, b = py.generate("A dog runs", cfg), nat.generate("A dog runs", cfg)
    assert a.adapter == b.adapter == "text" and a.token_ids == b.token_ids
    assert nat._engines  # the Python loop's session, opened for it
    assert "table" not in vars(nat)  # its decode loop embeds through the native core too
    bad = emb.copy()
    bad[1, 2] = np.nan
    with pytest.raises(InputError, match="the prompt rows contain NaN or Inf"):
        nat.native.generate_rows(bad, [], cfg)
    with pytest.raises(InputError, match="token ids must lie in"):
        nat.native.generate_rows(emb, [10**6], cfg)


def test_chat_turns_reuse_the_native_prefix_cache(library: Path, default_build: Path) -> None:
    from omniforge.runtime.llm import Chat, LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    py, nat = _pair(default_build)
    cfg = GenerationConfig(max_new_tokens=24)
    chats = [Chat(rt, cfg, adapter="none") for rt in (py, nat)]
    turns = ["Describe a harbour at dawn", "And at night?", "Which one is calmer?"]
    for k, turn in enumerate(turns):
        a, b = (c.send(turn) for c in chats)
        _same(a, b)
        if k:  # the earlier turns' KV is copied, in whole blocks, by both loops alike
            assert b.reused_prefix_tokens == a.reused_prefix_tokens > 0
    off = LlmRuntime(default_build, prefix_cache_entries=0, backend="native")
    chat = Chat(off, cfg, adapter="none")
    chat.send(turns[0])
    assert chat.send(turns[1]).reused_prefix_tokens == 0


def test_auto_picks_the_library_and_a_missing_one_is_one_sentence(
    library: Path, default_build: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import omniforge.runtime.llm as llm_module
    from omniforge.errors import ConfigError, EngineError
    from omniforge.runtime.llm import LlmRuntime

    monkeypatch.delenv("OMNIFORGE_LLM_BACKEND", raising=False)
    assert LlmRuntime(default_build).backend == "native"
    with monkeypatch.context() as m:  # a second LLM session (the native core's) would take over half
        m.setattr(llm_module, "available_memory", lambda: 1 << 20)  # the memory available
        assert LlmRuntime(default_build).backend == "python"
        assert LlmRuntime(default_build, backend="native").backend == "native"  # asked for: held twice
    monkeypatch.setenv("OMNIFORGE_LLM_BACKEND", "python")
    assert LlmRuntime(default_build).backend == "python"
    assert LlmRuntime(default_build, backend="native").backend == "native"  # explicit wins
    monkeypatch.setenv("OMNIFORGE_NATIVE_LIBRARY", str(tmp_path / "nowhere.so"))
    with pytest.raises(EngineError, match="nowhere.so, which is not a file"):
        LlmRuntime(default_build, backend="native")
    with pytest.raises(ConfigError, match="backend must be one of auto, native, python"):
        LlmRuntime(default_build, backend="fast")


def _user_llama(tmp_path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from omniforge.model.tokenizer import save_tokenizer, train_tokenizer

    torch.manual_seed(3)
    conf = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
    )
    folder = tmp_path / "user-llama"
    LlamaForCausalLM(conf).eval().save_pretrained(folder)
    save_tokenizer(train_tokenizer(512), folder)
    return folder


@pytest.fixture(scope="module")
def streamed_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A user's Llama folder written by the streaming build at fp32 and int4: LLM graphs whose
    weights lie in external-data files."""
    from omniforge.build import BuildOptions, build

    tmp = tmp_path_factory.mktemp("native-streamed")
    folder = _user_llama(tmp)
    out = {}
    for precision in ("fp32", "int4"):
        opts = BuildOptions(precision=precision, cache=tmp / "cache", llm_stream="always")
        build(folder, tmp / precision, opts, log=lambda _m: None)
        out[precision] = tmp / precision
    return out


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_user_llama_folder_with_external_data_same_greedy_tokens(
    library: Path, streamed_builds: dict[str, Path], precision: str
) -> None:
    from omniforge.pipeline.contracts import Role
    from omniforge.pipeline.manifest import load_manifest
    from omniforge.runtime.sampling import GenerationConfig

    build = streamed_builds[precision]
    assert load_manifest(build).variant("llm", Role.ORT_INPLACE_LLM).data_files  # weights outside the graph
    py, nat = _pair(build)
    for prompt in ("hello there", [3, 4, 5, 6]):
        cfg = GenerationConfig(max_new_tokens=64, stop_token_ids=())
        _same(py.generate(prompt, cfg), nat.generate(prompt, cfg))


def test_external_data_is_verified_and_must_be_listed(
    library: Path, streamed_builds: dict[str, Path], tmp_path: Path
) -> None:
    """The native core's own checks (the Python runtime opens it without hashing again): a flipped
    byte in an external-data file, and a graph reading a file its variant does not list."""
    import json
    import shutil

    from omniforge.errors import ManifestError
    from omniforge.pipeline.contracts import Role
    from omniforge.pipeline.manifest import load_manifest
    from omniforge.runtime.native import NativeLlm

    flipped = tmp_path / "flipped"
    shutil.copytree(streamed_builds["fp32"], flipped)
    data = flipped / load_manifest(flipped).variant("llm", Role.ORT_INPLACE_LLM).data_files[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="does not match its SHA-256"):
        NativeLlm(flipped, 1, 64)

    unlisted = tmp_path / "unlisted"
    shutil.copytree(streamed_builds["fp32"], unlisted)
    manifest = json.loads((unlisted / "manifest.json").read_text())
    for stage in manifest["stages"].values():
        for v in stage.get("variants", []):
            v["data_files"] = []
    (unlisted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="reads external data .* that the manifest does not list for it"):
        NativeLlm(unlisted, 1, 64)


def test_context_limit_threads_and_refusals_as_the_python_loop(library: Path, default_build: Path) -> None:
    import threading

    from omniforge.errors import ContextLengthError
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    short = LlmRuntime(default_build, num_slots=1, max_context=40, prefix_cache_entries=0, backend="native")
    r = short.generate(
        "Describe the image.", GenerationConfig(max_new_tokens=200, stop_token_ids=()), adapter="none"
    )
    assert r.finish_reason == "length" and r.prompt_tokens + r.new_tokens == 41
    with pytest.raises(ContextLengthError, match="the context holds 40"):
        short.generate(list(range(2, 45)), adapter="none")

    py, nat = _pair(default_build)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=4)
    serial = [py.generate(p, cfg, adapter="none").token_ids for p in PROMPTS]
    results, errors = [], []

    def work(k: int) -> None:
        try:
            for _ in range(3):
                results.append((k, nat.generate(PROMPTS[k], cfg, adapter="none").token_ids))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 * len(PROMPTS)
    assert all(ids == serial[k] for k, ids in results)

# ruff: noqa: F811  (the native fixtures are imported from tests/test_native.py by name)
"""The native core's sampling and streaming: the sampler against ``omniforge.runtime.sampling``
(numpy's generator reproduced bit for bit, so seeded draws are the same tokens), distribution-level
properties of top-k, top-p and the repetition penalty, and whole requests through the C API
(``of_llm_generate`` with a streaming callback) against ``LlmRuntime.generate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_native import (  # noqa: F401  (fixtures)
    BASE,
    _env,
    _run,
    native_build,
    native_cache,
    ort_headers,
    ort_library,
)


def _sample(native: Path, cases: list[dict]) -> list[list[int]]:
    r = _run([str(native / "omniforge_sample")], input=json.dumps(cases))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _case(logits: np.ndarray, history=(), temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, seed=0, draws=1):
    return {
        "logits": np.asarray(logits, np.float32).tolist(),
        "history": list(history),
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "penalty": penalty,
        "seed": seed,
        "draws": draws,
    }


def test_sampler_draws_the_tokens_numpy_draws(native_build: Path) -> None:
    from omniforge.runtime.sampling import GenerationConfig, select_token

    rs = np.random.default_rng(0)
    cases, want = [], []
    for i in range(300):
        v = int(rs.integers(2, 700))
        logits = (rs.normal(size=v) * rs.uniform(0.1, 6)).astype(np.float32)
        history = rs.integers(0, v, size=int(rs.integers(0, 20))).tolist()
        t = float(rs.choice([0.0, 0.3, 0.7, 1.0, 1.5]))
        k = int(rs.choice([0, 1, 5, 40, v + 3]))
        p = float(rs.choice([1.0, 0.9, 0.5, 0.05]))
        pen = float(rs.choice([1.0, 1.3, 0.8]))
        seed = int(rs.integers(0, 2**64, dtype=np.uint64)) if i % 2 else i
        cfg = GenerationConfig(temperature=t, top_k=k, top_p=p, repetition_penalty=pen, seed=seed)
        g = np.random.default_rng(seed)
        want.append([select_token(logits, cfg, g, np.asarray(history, np.int64)) for _ in range(20)])
        cases.append(_case(logits, history, t, k, p, pen, seed, draws=20))
    got = _sample(native_build, cases)
    bad = [i for i in range(len(want)) if got[i] != want[i]]
    assert not bad, f"case {bad[0]}: native {got[bad[0]]} != numpy {want[bad[0]]}"


def test_sampler_distribution_properties(native_build: Path) -> None:
    rs = np.random.default_rng(1)
    logits = rs.normal(size=200).astype(np.float32) * 2
    order = np.argsort(-logits, kind="stable")
    draws = 4000
    top_k, top_p, seeded, other_seed, base, penalised = _sample(
        native_build,
        [
            _case(logits, top_k=7, seed=5, draws=draws),
            _case(logits, top_p=0.6, seed=6, draws=draws),
            _case(logits, seed=42, draws=50),
            _case(logits, seed=43, draws=50),
            _case(logits, seed=8, draws=draws),
            _case(logits, history=[int(order[0])] * 3, penalty=3.0, seed=8, draws=draws),
        ],
    )
    # top-k never picks outside the k most likely, and uses more than one of them
    assert set(top_k) <= set(order[:7].tolist()) and len(set(top_k)) > 3
    # top-p picks only inside the smallest set whose mass reaches p, in proportion to its mass
    probs = np.exp(logits - logits.max()).astype(np.float64)
    probs /= probs.sum()
    cum = np.cumsum(probs[order])
    nucleus = order[: int(np.searchsorted(cum, 0.6) + 1)]
    assert set(top_p) <= set(nucleus.tolist())
    kept = probs[nucleus] / probs[nucleus].sum()
    freq = np.bincount(top_p, minlength=200)[nucleus] / draws
    assert np.abs(freq - kept).max() < 0.04
    # plain sampling follows the softmax
    freq = np.bincount(base, minlength=200) / draws
    assert np.abs(freq - probs).max() < 0.04
    # the penalty lowers the chosen token's share (a positive logit is divided)
    assert logits[order[0]] > 0
    assert np.mean(np.asarray(penalised) == order[0]) < 0.5 * np.mean(np.asarray(base) == order[0])
    # a seed fixes the draws; another seed gives others
    assert _sample(native_build, [_case(logits, seed=42, draws=50)])[0] == seeded
    assert seeded != other_seed


def _generate(native: Path, build: Path, env: dict, ids: list[int], *args: str) -> dict:
    r = _run([str(native / "omniforge_generate"), str(build), *args, "--", *map(str, ids)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


CONFIGS = [
    {},
    {"temperature": 0.8, "seed": 3},
    {"temperature": 1.2, "top_k": 20, "seed": 7},
    {"temperature": 0.9, "top_p": 0.8, "repetition_penalty": 1.3, "seed": 2**64 - 1},
    {"repetition_penalty": 1.5},
]
FLAGS = {
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "repetition_penalty": "--penalty",
    "seed": "--seed",
}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "greedy")
def test_generation_equals_the_python_runtime(
    native_build: Path, default_build: Path, ort_library: str, cfg: dict
) -> None:
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    ids = [1, 5, 9, 3, 7]
    want = LlmRuntime(default_build).generate(
        ids, GenerationConfig(max_new_tokens=40, stop_token_ids=(), **cfg), adapter=BASE
    )
    args = ["--max", "40", "--stops", "none"]
    for k, v in cfg.items():
        args += [FLAGS[k], str(v)]
    got = _generate(native_build, default_build, _env(default_build, ort_library), ids, *args)
    assert got["tokens"] == want.token_ids
    assert got["finish"] == want.finish_reason == "length"
    assert [t for t, _ in got["streamed"]] == got["tokens"]  # one callback per token, in order


def test_stop_ids_and_cancellation(native_build: Path, default_build: Path, ort_library: str) -> None:
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    env = _env(default_build, ort_library)
    ids = [3, 8, 13]
    free = _generate(native_build, default_build, env, ids, "--max", "30", "--stops", "none")["tokens"]
    stop = free[6]
    want = LlmRuntime(default_build).generate(
        ids, GenerationConfig(max_new_tokens=30, stop_token_ids=(stop, 99999)), adapter=BASE
    )
    got = _generate(native_build, default_build, env, ids, "--max", "30", "--stops", f"{stop},99999")
    assert got["tokens"] == want.token_ids == free[: free.index(stop) + 1]
    assert got["finish"] == want.finish_reason == "stop"
    # a callback returning nonzero ends the request after that token
    got = _generate(
        native_build, default_build, env, ids, "--max", "30", "--stops", "none", "--cancel-after", "4"
    )
    assert got["tokens"] == free[:4] and got["finish"] == "cancelled" and len(got["streamed"]) == 4


def _generate_text(native: Path, build: Path, env: dict, prompt: str, *args: str) -> dict:
    r = _run([str(native / "omniforge_generate"), str(build), "--text", prompt, *args], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.parametrize(
    "prompt, cfg",
    [
        ("Describe a harbour at dawn.", {}),
        ("Make a picture of a red kite over the hills", {"temperature": 0.9, "top_k": 40, "seed": 5}),
        ("naïve café — 東京 \U0001f600 [IMG0] <image>", {"temperature": 1.3, "top_p": 0.95, "seed": 9}),
    ],
)
def test_text_prompts_stream_the_python_runtimes_text(
    native_build: Path, default_build: Path, ort_library: str, prompt: str, cfg: dict
) -> None:
    """Text in (the build's tokenizer in C++), the model's EOS as the default stop id, and the
    streamed pieces: never a split character, the same pieces as the Python runtime's on_text."""
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    pieces: list[str] = []
    want = LlmRuntime(default_build).generate(
        prompt, GenerationConfig(max_new_tokens=48, **cfg), on_text=pieces.append, adapter=BASE
    )
    args = ["--max", "48"]
    for k, v in cfg.items():
        args += [FLAGS[k], str(v)]
    got = _generate_text(native_build, default_build, _env(default_build, ort_library), prompt, *args)
    assert got["tokens"] == want.token_ids
    assert got["prompt_tokens"] == want.prompt_tokens
    assert got["finish"] == want.finish_reason
    assert got["text"] == want.text
    assert [t for _, t in got["streamed"] if t] == pieces
    assert got["streamed_text"] == "".join(pieces)


def test_stop_strings_cut_the_text_as_the_python_runtime(
    native_build: Path, default_build: Path, ort_library: str
) -> None:
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    env = _env(default_build, ort_library)
    prompt = "Tell me about the sea"
    free = _generate_text(native_build, default_build, env, prompt, "--max", "48", "--stops", "none")
    text = free["text"]
    assert len(text) > 12, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    rt = LlmRuntime(default_build)
    for stops in ([stop], ["\u2603never", stop]):
        pieces: list[str] = []
        cfg = GenerationConfig(max_new_tokens=48, stop_token_ids=(), stop_strings=tuple(stops))
        want = rt.generate(prompt, cfg, on_text=pieces.append, adapter=BASE)
        args = [a for s in stops for a in ("--stop-string", s)]
        got = _generate_text(
            native_build, default_build, env, prompt, "--max", "48", "--stops", "none", *args
        )
        assert want.finish_reason == got["finish"] == "stop_string"
        assert got["tokens"] == want.token_ids and got["text"] == want.text == text[: text.find(stop)]
        assert [t for _, t in got["streamed"] if t] == pieces


def test_text_refusals(native_build: Path, default_build: Path, ort_library: str) -> None:
    """Empty and oversized text prompts: the status, and the Python runtime's sentence."""
    from omniforge.errors import ContextLengthError
    from omniforge.runtime.llm import LlmRuntime

    env = _env(default_build, ort_library)
    rt = LlmRuntime(default_build)
    r = _run([str(native_build / "omniforge_generate"), str(default_build), "--text", ""], env=env)
    assert r.returncode == 1 and r.stderr.strip() == "OF_ERR_INPUT: the prompt is empty"
    for prompt in ("word " * 20000, "word " * 300):  # refused before tokenizing; refused once tokenized
        with pytest.raises(ContextLengthError) as e:
            rt.generate(prompt)
        r = _run([str(native_build / "omniforge_generate"), str(default_build), "--text", prompt], env=env)
        assert r.returncode == 1 and r.stderr.strip() == f"OF_ERR_CONTEXT_LENGTH: {e.value}"

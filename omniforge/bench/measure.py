"""What ``omniforge bench`` measures for one build (run in its own process for a clean peak RSS)."""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from omniforge.bench.stats import measure
from omniforge.pipeline.contracts import Role

PROMPT = "Describe the image in one sentence."


def read_bandwidth(threads: int = 2, mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s this machine streams from memory: the best of a ``threads``-way numpy sum and a BLAS
    matrix-vector product over a buffer far larger than the caches (how a decode step reads weights)."""
    buf = np.ones(mib * 1024 * 1024 // 4, np.float32)
    parts = np.array_split(buf, threads)

    def summed() -> None:
        ts = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    mat, vec = buf.reshape(-1, 1024), np.ones(1024, np.float32)
    best = float("inf")
    for fn in (summed, lambda: mat @ vec):
        fn()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def stage_call(build, name: str, context: int = 32) -> Callable[[], object]:
    """One call of a stage as the runtime makes it, inputs prepared beforehand: the stage's engine at
    its opt shapes, or for the LLM one in-place decode step after ``context`` cached tokens."""
    spec = build.pipeline.stage(name)
    if build.manifest.stage_build(name).variant(Role.ORT_INPLACE_LLM) is not None:
        from omniforge.runtime.kv_cache import KVCachePool, SlotRange
        from omniforge.runtime.llm import LlmEngine

        g = spec.llm
        engine = LlmEngine.of_build(build)
        pool = KVCachePool(g, 1, max_context=min(g.max_context, 2 * context))
        binding = engine.bind(pool, SlotRange(0, 1))
        row = np.zeros((1, 1, g.hidden_size), np.float32)

        def step() -> None:
            pool.lengths[0] = context
            binding.step(row, trusted=True)  # the decode loop's own call

        return step
    session = build.engine(name).session
    feeds = spec.sample_inputs("opt")
    return lambda: session.run(None, feeds)


IMAGE_REQUEST = "image + prompt in, text + image out"  # the request the PyTorch reference mirrors


def bench_media(build, folder: Path) -> dict[str, object]:
    """A sample input for each medium the build encodes (image before audio): a grey 32 x 32
    image; a 1 s 440 Hz tone at 16 kHz written to ``folder`` (the audio front ends resample it)."""
    import wave

    media: dict[str, object] = {}
    if "image_encoder" in build.manifest.stages:
        media["image"] = np.full((32, 32, 3), 127, np.uint8)
    if "audio_encoder" in build.manifest.stages:
        tone = (0.3 * 32767 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.int16)
        with wave.open(str(folder / "tone.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(tone.tobytes())
        media["audio"] = folder / "tone.wav"
    return media


def e2e_request(media_in: list[str], media_out: list[str]) -> str:
    """``image + prompt in, text + image out`` and its kin, for the report."""
    return f"{' + '.join([*media_in, 'prompt'])} in, {' + '.join(['text', *media_out])} out"


def bench_build(path: Path, name: str, threads: int, runs: int, steps: int, new_tokens: int) -> dict:
    import onnx

    from omniforge.runtime.build import Build
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
    from omniforge.runtime.sampling import GenerationConfig

    b = Build(path, SessionConfig(threads=threads))
    out: dict = {"name": name, "path": str(path), "stages": []}
    for stage, sb in b.manifest.stages.items():
        file = b.path / sb.runtime_variant().file
        stats = measure(stage_call(b, stage), runs=runs)
        out["stages"].append(
            {
                "stage": stage,
                "precision": sb.precision,
                "latency_ms": stats.to_dict(),
                "size_kib": round(file.stat().st_size / 1024),
            }
        )
    pipe = Pipeline(b, num_slots=4)
    rt = pipe.llm
    g = rt.geometry
    llm: dict = {}
    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=())
    vocab = np.arange(5, min(g.vocab_size, 400))
    for n in (16, 64, 128):
        ids = np.resize(vocab, n).tolist()
        llm[f"ttft_ms_prompt{n}"] = float(
            np.median([rt.generate(ids, GenerationConfig(max_new_tokens=1)).ttft_s for _ in range(3)]) * 1000
        )
    scratch = tempfile.TemporaryDirectory()
    media_in = bench_media(b, Path(scratch.name))
    if media_in:  # the first medium the build encodes: its rows ahead of a 16-token prompt
        modality, sample = next(iter(media_in.items()))
        rows = getattr(pipe, f"encode_{modality}")(sample)
        media_prompt = np.concatenate([rows, rt.embed_ids(np.resize(vocab, 16))])
        llm[f"ttft_ms_prompt16_plus_{modality}"] = float(
            np.median(
                [rt.generate(media_prompt, GenerationConfig(max_new_tokens=1)).ttft_s for _ in range(3)]
            )
            * 1000
        )
    single = [rt.generate(np.resize(vocab, 16).tolist(), cfg) for _ in range(3)]
    tps = float(np.median([r.decode_tokens_per_s for r in single]))
    llm["tokens_per_s_batch1"] = tps
    llm["ms_per_output_token"] = 1000 / tps
    batch = rt.generate_batch([np.resize(vocab, 16 + i).tolist() for i in range(4)], cfg)
    llm["tokens_per_s_batch4"] = 4 * (new_tokens - 1) / batch[0].decode_s
    curve = {}
    for ctx in (16, 64, 128, 192):
        if ctx + new_tokens < rt.pool.max_context:
            curve[str(ctx)] = float(
                np.median(
                    [rt.generate(np.resize(vocab, ctx).tolist(), cfg).decode_tokens_per_s for _ in range(2)]
                )
            )
    llm["tokens_per_s_by_context"] = curve
    weights = sum(
        int(np.prod(t.dims)) * _itemsize(t.data_type)
        for t in onnx.load(str(b.stage_file("llm", Role.ORT_INPLACE_LLM))).graph.initializer
    )
    llm["weight_bytes_per_token"] = weights
    out["llm"] = llm
    totals, stage_ms = [], []
    media_out = [m for m in ("image", "video", "audio") if f"{m}_output_projector" in b.manifest.stages][:1]
    request = e2e_request(list(media_in)[:1], media_out)
    for i in range(3):
        r = pipe.run(
            PROMPT,
            **{m: v for m, v in list(media_in.items())[:1]},
            generation=GenerationConfig(max_new_tokens=new_tokens),
            diffusion=DiffusionConfig(steps=steps, seed=i),
            force=media_out,
        )
        totals.append(r.timings["total"] * 1000)
        stage_ms.append({k: v * 1000 for k, v in r.timings.items() if k != "total"})
    scratch.cleanup()
    mid = int(np.argsort(totals)[1])
    out["e2e"] = {
        "request": request,
        "total_ms": float(np.median(totals)),
        "stages_ms": stage_ms[mid],
        "steps": steps,
        "new_tokens": new_tokens,
    }
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # after the peak is read: the bandwidth measurement streams a 512 MiB buffer of its own
    bw = read_bandwidth(threads)
    bound = bw / weights
    llm["read_bandwidth_GBps"] = bw / 1e9
    llm["bandwidth_bound_tokens_per_s"] = bound
    llm["roofline"] = f"achieved {100 * tps / bound:.0f}% of the bandwidth bound"
    if (path / "quantize.json").is_file():
        rep = {r["stage"]: r for r in json.loads((path / "quantize.json").read_text())}
        out["accuracy"] = float(rep.get("llm", {}).get("metrics", {}).get("logits_cosine", 1.0))
    else:
        out["accuracy"] = 1.0
    e2e = path / "accuracy_e2e.json"  # the image of the same prompt and seed vs the FP32 pipeline's
    out["image_psnr_db"] = (
        json.loads(e2e.read_text())["worst"].get("image_psnr_db") if e2e.is_file() else None
    )
    return out


def _itemsize(data_type: int) -> float:
    import onnx

    if data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8):
        return 1
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def main() -> None:
    """Worker entry: python -m omniforge.bench.measure PATH NAME THREADS RUNS STEPS TOKENS OUT.json"""
    path, name, threads, runs, steps, tokens, out = sys.argv[1:8]
    data = bench_build(Path(path), name, int(threads), int(runs), int(steps), int(tokens))
    Path(out).write_text(json.dumps(data))


if __name__ == "__main__":
    main()

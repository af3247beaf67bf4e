"""ONNX Runtime CPU latency of every stage before and after the graph passes, side by side.

usage: python benchmarks/graph_passes.py [--work /tmp/omniforge-bench] [--runs 50] [--threads 2]

Part 1 exports the tiny default (if needed), optimizes a copy, and times each stage at its ``opt``
shapes three ways: the raw export, the optimized canonical graph, and the ONNX Runtime-lowered
graph the runtime loads. Part 2 times one decode step (past 64) of the 150M LLaMA-shaped model
built by ``llm_decode.py``: the raw traced graph vs the lowered in-place graph, at fp32 and at INT4
(MatMulNBits, block 32, symmetric, accuracy level 4 on both). Results go to
benchmarks/results/graph_passes.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, read_bandwidth, write_results  # noqa: E402

from omniforge.pipeline.contracts import Role  # noqa: E402
from omniforge.runtime.engine import SessionConfig, open_session  # noqa: E402


def session(path: Path, threads: int) -> ort.InferenceSession:
    return open_session(path, "measurement", SessionConfig(threads=threads))


def time_runs(fn, runs: int) -> float:
    """Median milliseconds of ``fn`` after warm-up."""
    from omniforge.bench.stats import measure

    return measure(fn, runs=runs).p50


def stages_part(work: Path, runs: int, threads: int) -> list[dict]:
    from omniforge.export.exporter import export_pipeline
    from omniforge.model.tiny import ensure_default
    from omniforge.passes.build import optimize_build
    from omniforge.pipeline.manifest import load_manifest

    raw = work / "tiny-raw"
    opt = work / "tiny-opt"
    if not (raw / "manifest.json").is_file():
        export_pipeline(ensure_default(), raw, log=lambda _m: None)
    if not (opt / "manifest.json").is_file():
        optimize_build(raw, opt, log=lambda _m: None)
    m_raw, m_opt = load_manifest(raw), load_manifest(opt)
    rows = []
    for name, sb in m_raw.stages.items():
        spec = m_raw.pipeline.stage(name)
        feeds = spec.sample_inputs("opt", seed=0)
        paths = {"raw": raw / sb.file, "optimized": opt / m_opt.stages[name].file}
        lowered = m_opt.stages[name].variant(Role.ORT)
        if lowered is not None:
            paths["lowered"] = opt / lowered.file
        row = {"stage": name}
        for label, path in paths.items():
            s = session(path, threads)
            row[f"{label}_ms"] = time_runs(lambda s=s, f=feeds: s.run(None, f), runs)
            row[f"{label}_nodes"] = len(onnx.load(str(path), load_external_data=False).graph.node)
        best = row.get("lowered_ms", row["optimized_ms"])
        row["speedup"] = row["raw_ms"] / best
        rows.append(row)
        print(f"{name}: {row['raw_ms']:.3f} -> {best:.3f} ms ({row['speedup']:.2f}x)", file=sys.stderr)
    return rows


def int4(src: Path, dst: Path) -> Path:
    if dst.is_file():
        return dst
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    onnx.save_model(
        q.model.model,
        str(dst),
        save_as_external_data=True,
        location=dst.name + ".data",
        all_tensors_to_one_file=True,
    )
    return dst


def decode_step_part(work: Path, runs: int, threads: int) -> dict:
    """One decode step (past 64) of the 150M model: traced graph vs lowered in-place graph."""
    from omniforge.runtime.build import Build
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.kv_cache import KVCachePool, SlotRange
    from omniforge.runtime.llm import LlmEngine

    build = work / "build-150m"
    if not (build / "manifest.json").is_file():
        raise SystemExit("run benchmarks/llm_decode.py first: it builds the 150M model this part uses")
    b = Build(build)
    spec = b.pipeline.stage("llm")
    g = spec.llm
    past = 64
    raw_feeds = spec.sample_inputs({"batch": 1, "seq": 1, "past": past}, seed=0)
    out: dict = {}
    for precision in ("fp32", "int4"):
        raw_path, low_path = b.stage_file("llm"), b.stage_file("llm", Role.ORT_INPLACE_LLM)
        if precision == "int4":
            raw_path = int4(raw_path, work / "llm-150m-raw-int4.onnx")
            low_path = int4(low_path, work / "llm-150m-lowered-int4.onnx")
        raw = session(raw_path, threads)
        t_raw = time_runs(lambda raw=raw: raw.run(None, raw_feeds), runs)
        contract = b.manifest.variant("llm", Role.ORT_INPLACE_LLM).contract
        engine = LlmEngine(low_path, g, SessionConfig(threads=threads), contract)
        pool = KVCachePool(g, 1, max_context=past + runs + 16)
        binding = engine.bind(pool, SlotRange(0, 1))
        row = raw_feeds["inputs_embeds"]

        def step(binding=binding, pool=pool, row=row):
            pool.lengths[0] = past
            binding.step(row, trusted=True)

        t_low = time_runs(step, runs)
        out[precision] = {
            "raw_ms": t_raw,
            "lowered_ms": t_low,
            "speedup": t_raw / t_low,
            "raw_nodes": len(onnx.load(str(raw_path), load_external_data=False).graph.node),
            "lowered_nodes": len(onnx.load(str(low_path), load_external_data=False).graph.node),
        }
        print(f"decode step {precision}: {t_raw:.1f} -> {t_low:.1f} ms", file=sys.stderr)
    params = (
        sum(
            int(np.prod(t.dims))
            for t in onnx.load(str(b.stage_file("llm", Role.ORT_INPLACE_LLM))).graph.initializer
            if len(t.dims) == 2 and t.dims[0] * t.dims[1] > 1_000_000
        )
        + 0
    )
    bw = read_bandwidth(threads)
    out["fp32_bound_ms"] = params * 4 / bw * 1000
    out["fp32_of_bound"] = out["fp32_bound_ms"] / out["fp32"]["lowered_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/omniforge-bench")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = stages_part(work, args.runs, args.threads)
    decode = decode_step_part(work, max(20, args.runs // 2), args.threads)
    md = [
        "# Graph passes: ONNX Runtime CPU latency before and after",
        "",
        f"{machine().get('cpu', '?')}, {args.threads} threads, median of {args.runs} runs at each stage's `opt` shapes.",
        "",
        "## Stages of the tiny default build",
        "",
        "| stage | nodes raw | nodes optimized | nodes lowered | raw (ms) | optimized (ms) | lowered (ms) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['stage']} | {r['raw_nodes']} | {r['optimized_nodes']} | {r.get('lowered_nodes', '-')} | "
            f"{r['raw_ms']:.3f} | {r['optimized_ms']:.3f} | "
            f"{r['lowered_ms']:.3f} | {r['speedup']:.2f}x |"
            if "lowered_ms" in r
            else f"| {r['stage']} | {r['raw_nodes']} | {r['optimized_nodes']} | - | {r['raw_ms']:.3f} | "
            f"{r['optimized_ms']:.3f} | - | {r['speedup']:.2f}x |"
        )
    md += [
        "",
        "## LLM decode step, 150M LLaMA-shaped model (past 64, batch 1)",
        "",
        "| precision | traced graph nodes | lowered graph nodes | traced (ms) | lowered (ms) | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in ("fp32", "int4"):
        d = decode[p]
        md.append(
            f"| {p} | {d['raw_nodes']} | {d['lowered_nodes']} | {d['raw_ms']:.1f} | {d['lowered_ms']:.1f} | "
            f"{d['speedup']:.2f}x |"
        )
    md += [
        "",
        f"fp32 lowered decode step vs the memory-bandwidth bound ({decode['fp32_bound_ms']:.1f} ms for the "
        f"weights read per token): **{100 * decode['fp32_of_bound']:.0f}%** of the bound.",
    ]
    data = {"machine": machine(), "settings": vars(args), "stages": rows, "decode_step": decode}
    write_results("graph_passes", data, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

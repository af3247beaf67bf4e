"""Bench results as JSON, a Markdown table, PNG plots, and a comparison with an earlier run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omniforge.bench.measure import IMAGE_REQUEST


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# omniforge bench: {', '.join(b['name'] for b in data['builds'])}",
        "",
        f"{data['machine'].get('cpu', '?')}, {data['settings']['threads']} threads.",
        "",
    ]
    lines += [
        "## Per stage (ms at the stage's opt shapes)",
        "",
        "| build | stage | precision | min | p50 | p90 | p99 | mean | spread | size (KiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in data["builds"]:
        for s in b["stages"]:
            t = s["latency_ms"]
            lines.append(
                f"| {b['name']} | {s['stage']} | {s['precision']} | {t['min']:.3f} | {t['p50']:.3f} | "
                f"{t['p90']:.3f} | {t['p99']:.3f} | {t['mean']:.3f} | {t['spread']:.0%} | {s['size_kib']} |"
            )
    lines += ["", "## LLM", "", "| build | metric | value |", "|---|---|---:|"]
    for b in data["builds"]:
        llm = b.get("llm") or {}
        for k, v in llm.items():
            if isinstance(v, int | float):
                lines.append(f"| {b['name']} | {k} | {v:.4g} |")
        if "roofline" in llm:
            lines.append(f"| {b['name']} | roofline | {llm['roofline']} |")
    lines += [
        "",
        "## End to end",
        "",
        "| build | request | total (ms) | vs PyTorch eager | peak RSS (MiB) | per stage (ms) |",
        "|---|---|---:|---:|---:|---|",
    ]
    ref = data.get("reference")
    for b in data["builds"]:
        e = b["e2e"]
        request = e.get("request", IMAGE_REQUEST)
        same = ref and request == IMAGE_REQUEST  # the reference runs that request only
        ratio = f"{ref['total_ms'] / e['total_ms']:.2f}x" if same else "-"
        per = ", ".join(f"{k} {v:.0f}" for k, v in e["stages_ms"].items())
        lines.append(
            f"| {b['name']} | {request} | {e['total_ms']:.0f} | {ratio} | {b['peak_rss_mib']:.0f} | {per} |"
        )
    if ref:
        lines.append(
            f"| PyTorch eager reference | {IMAGE_REQUEST} | {ref['total_ms']:.0f} | 1.00x | - | "
            + ", ".join(f"{k} {v:.0f}" for k, v in ref["stages_ms"].items())
            + " |"
        )
    return "\n".join(lines)


def plots(data: dict[str, Any], out: Path) -> list[Path]:
    """latency per stage per build; tokens/s vs context length; accuracy vs speed per build."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    builds = data["builds"]
    stages = [s["stage"] for s in builds[0]["stages"]]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(builds)
    for i, b in enumerate(builds):
        p50 = {s["stage"]: s["latency_ms"]["p50"] for s in b["stages"]}
        ax.bar(
            [j + i * width for j in range(len(stages))],
            [p50.get(s, 0) for s in stages],
            width,
            label=b["name"],
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(stages))], stages, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("latency per call, p50 (ms, log scale)")
    ax.set_title("Stage latency per build")
    ax.legend()
    fig.tight_layout()
    written.append(out / "latency_per_stage.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in builds:
        curve = (b.get("llm") or {}).get("tokens_per_s_by_context") or {}
        if curve:
            xs = sorted(int(k) for k in curve)
            ax.plot(xs, [curve[str(x)] for x in xs], marker="o", label=b["name"])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode speed (tokens/s)")
    ax.set_title("LLM decode speed vs context length")
    ax.legend()
    fig.tight_layout()
    written.append(out / "tokens_per_s_vs_context.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def psnr_of(b: dict) -> float | None:
        v = b.get("image_psnr_db")
        return v if v is not None and v != float("inf") else None

    psnrs = [psnr_of(b) for b in builds if psnr_of(b) is not None]
    top = max(psnrs) + 5 if psnrs else None
    for i, b in enumerate(builds):
        if top is not None:  # end-to-end image PSNR; a build without one is the FP32 reference
            y = psnr_of(b) if psnr_of(b) is not None else top
            label = b["name"] if psnr_of(b) is not None else f"{b['name']} (= FP32)"
        else:
            y, label = b.get("accuracy", 1.0), b["name"]
        ax.scatter([b["e2e"]["total_ms"]], [y], s=60)
        offset = (6, 8) if i % 2 == 0 else (6, -14)  # alternate so close points keep readable labels
        ax.annotate(label, (b["e2e"]["total_ms"], y), textcoords="offset points", xytext=offset, fontsize=9)
    ax.margins(x=0.2, y=0.2)
    ax.set_xlabel("end-to-end latency (ms, lower is better)")
    ax.set_ylabel("image PSNR vs FP32 (dB)" if top is not None else "LLM logits cosine vs FP32")
    ax.set_title("Accuracy vs speed per build")
    fig.tight_layout()
    written.append(out / "accuracy_vs_speed.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def compare_runs(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Per build and stage, the p50 change against an earlier run."""
    lines = ["| build | stage | old p50 (ms) | new p50 (ms) | change |", "|---|---|---:|---:|---:|"]
    old_b = {b["name"]: b for b in old.get("builds", [])}
    for b in new["builds"]:
        ob = old_b.get(b["name"])
        if ob is None:
            continue
        o = {s["stage"]: s["latency_ms"]["p50"] for s in ob["stages"]}
        for s in b["stages"]:
            if s["stage"] in o:
                n, p = s["latency_ms"]["p50"], o[s["stage"]]
                lines.append(f"| {b['name']} | {s['stage']} | {p:.3f} | {n:.3f} | {(n - p) / p:+.1%} |")
        if "e2e" in ob:
            n, p = b["e2e"]["total_ms"], ob["e2e"]["total_ms"]
            lines.append(f"| {b['name']} | end to end | {p:.1f} | {n:.1f} | {(n - p) / p:+.1%} |")
    return "\n".join(lines)

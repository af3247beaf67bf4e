"""Quantization accuracy on trained weights: perplexity of a small LLaMA trained here, FP32 vs INT8/INT4.

usage: python benchmarks/llm_quant_accuracy.py [--work /tmp/omniforge-bench] [--minutes 1.5]

Random weights make quantization accuracy meaningless, so this fixture trains a small LLaMA
(hidden 128, 4 layers, 4 heads / 2 KV heads, context 128, BPE vocab 2048) for a few minutes on
text that ships with Python itself (the docstrings of a fixed list of standard-library modules),
exports it with omniforge, quantizes it, and measures on held-out text through the runtime's
in-place LLM graph: perplexity, top-1 agreement and KL divergence of next-token distributions
against FP32. Results go to benchmarks/results/llm_quant_accuracy.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

MODULES = [
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "zipfile",
]
CTX = 128


def corpus() -> str:
    """Docstrings of the modules above and their public members (deterministic for a Python version)."""
    parts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None))
            if doc and len(doc) > 80:
                parts.append(doc)
    return "\n\n".join(dict.fromkeys(p for p in parts if p))


def train(folder: Path, minutes: float, threads: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    from omniforge.model.tokenizer import save_tokenizer

    text = corpus()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text.split("\n\n"),
        trainers.BpeTrainer(
            vocab_size=2048,
            special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    ids = np.array(tok.encode(text).ids, np.int64)
    chunks = ids[: len(ids) // CTX * CTX].reshape(-1, CTX)
    held = np.arange(len(chunks)) % 20 == 7  # every 20th chunk is held out: same distribution, unseen text
    np.save(folder.parent / "heldout.npy", chunks[held].ravel())
    train_ids = torch.from_numpy(chunks[~held].ravel())
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    conf = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CTX,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(conf)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    t_end, step = time.time() + 60 * minutes, 0
    while time.time() < t_end:
        starts = torch.randint(0, len(train_ids) - CTX - 1, (16,), generator=gen)
        batch = torch.stack([train_ids[s : s + CTX] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f}", file=sys.stderr)
    model.eval().save_pretrained(folder)
    save_tokenizer(tok, folder)


def calibration(folder: Path, build: Path, count: int = 16) -> list[np.ndarray]:
    """Training chunks (never held-out ones) as embedding rows, for the calibrated method."""
    from tokenizers import Tokenizer

    from omniforge.runtime.llm import LlmRuntime

    ids = np.array(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(corpus()).ids, np.int64)
    chunks = ids[: len(ids) // CTX * CTX].reshape(-1, CTX)
    train = chunks[np.arange(len(chunks)) % 20 != 7][:count]
    rt = LlmRuntime(build, num_slots=1, prefix_cache_entries=0)
    return [rt.embed_ids(c) for c in train]


def evaluate(build: Path, heldout: np.ndarray, sequences: int) -> np.ndarray:
    """(sequences, CTX - 1, V) next-token logits through the build's in-place LLM graph."""
    from omniforge.runtime.kv_cache import SlotRange
    from omniforge.runtime.llm import LlmRuntime

    rt = LlmRuntime(build, num_slots=1, prefix_cache_entries=0, max_context=CTX)
    out = []
    for s in range(sequences):
        seq = heldout[s * CTX : (s + 1) * CTX]
        slot = rt.pool.allocate(1)
        binding = rt.engine.bind(rt.pool, SlotRange(slot.start, 1))
        rows = rt.embed_ids(seq)
        logits = [binding.step(rows[None, t : t + 1])[0][0] for t in range(CTX - 1)]
        rt.pool.release(slot)
        out.append(np.stack(logits))
    return np.stack(out)


def perplexity(logits: np.ndarray, heldout: np.ndarray) -> float:
    from omniforge.calibration.metrics import log_softmax

    n, t, _ = logits.shape
    targets = np.stack([heldout[s * CTX + 1 : (s + 1) * CTX] for s in range(n)])
    lp = log_softmax(logits)
    nll = -np.take_along_axis(lp, targets[..., None], axis=-1).mean()
    return float(np.exp(nll))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/omniforge-bench")
    ap.add_argument("--minutes", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=0, help="held-out sequences to score (0: all)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    from omniforge.calibration.metrics import kl_divergence, top1_agreement
    from omniforge.calibration.quantize import quantize_build
    from omniforge.calibration.weight_only import WeightOnlyConfig
    from omniforge.export.exporter import export_pipeline

    work = Path(args.work) / "trained-llm"
    folder = work / "llama"
    if not (folder / "config.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        train(folder, args.minutes, args.threads)
    heldout = np.load(work / "heldout.npy")
    args.sequences = min(args.sequences or len(heldout) // CTX, len(heldout) // CTX)
    fp32 = work / "build-fp32"
    if not (fp32 / "manifest.json").is_file():
        export_pipeline(folder, fp32, log=lambda m: print(m, file=sys.stderr))
    variants = {
        "INT8 weight-only, block 32": ("int8", WeightOnlyConfig(bits=8, block_size=32)),
        "INT4 RTN symmetric, block 32": ("int4", WeightOnlyConfig(bits=4, block_size=32)),
        "INT4 RTN asymmetric, block 32": ("int4", WeightOnlyConfig(bits=4, block_size=32, symmetric=False)),
        "INT4 AWQ symmetric, block 32": ("int4", WeightOnlyConfig(bits=4, block_size=32, method="awq")),
        "INT4 GPTQ symmetric, block 32": ("int4", WeightOnlyConfig(bits=4, block_size=32, method="gptq")),
        "INT4 GPTQ symmetric, block 128": ("int4", WeightOnlyConfig(bits=4, block_size=128, method="gptq")),
        "INT4 RTN symmetric, block 128": ("int4", WeightOnlyConfig(bits=4, block_size=128)),
    }
    ref = evaluate(fp32, heldout, args.sequences)
    rows = {"FP32": {"perplexity": perplexity(ref, heldout), "top1_agreement": 1.0, "kl_divergence": 0.0}}
    for name, (precision, cfg) in variants.items():
        path = work / f"build-{precision}-{cfg.method}-b{cfg.block_size}-{'sym' if cfg.symmetric else 'asym'}"
        if not (path / "manifest.json").is_file():
            calib = calibration(folder, fp32) if cfg.method != "rtn" else None
            quantize_build(fp32, path, precision, cfg, log=lambda _m: None, calibration=calib)
        got = evaluate(path, heldout, args.sequences)
        rows[name] = {
            "perplexity": perplexity(got, heldout),
            "top1_agreement": top1_agreement(ref, got),
            "kl_divergence": kl_divergence(ref, got),
        }
        print(name, rows[name], file=sys.stderr)
    base = rows["FP32"]["perplexity"]
    md = [
        "# Quantization accuracy on trained weights (small LLaMA trained on Python's docstrings)",
        "",
        f"{machine().get('cpu', '?')}; {args.sequences} held-out sequences of {CTX} tokens; next-token metrics "
        "against FP32 through the runtime's in-place LLM graph.",
        "",
        "| variant | perplexity | vs FP32 | top-1 agreement | KL divergence |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        md.append(
            f"| {name} | {r['perplexity']:.2f} | {r['perplexity'] / base - 1:+.1%} | {r['top1_agreement']:.3f} | "
            f"{r['kl_divergence']:.4f} |"
        )
    md += [
        "",
        "AWQ: per-channel scales searched on 16 training chunks (never held-out ones), folded into the RMSNorm "
        "gammas and up_proj; o_proj and the LM head stay plain RTN. GPTQ: Hessians of every linear layer's "
        "input (the LM head included) over the same 16 chunks, 1% damping, error spread in input-channel order.",
    ]
    write_results(
        "llm_quant_accuracy", {"machine": machine(), "settings": vars(args), "rows": rows}, "\n".join(md)
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()

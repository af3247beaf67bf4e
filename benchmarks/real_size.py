"""Real size: a Vicuna-7B-shaped LLaMA built to INT4 and decoded, omniforge vs ONNX Runtime GenAI vs llama.cpp.

usage: python benchmarks/real_size.py [--size 7b|1b|tiny] [--work DIR] [--runs 3] [--threads 2]
                                      [--prompt 128] [--new 64] [--sequential] [--skip genai,llamacpp]
                                      [--llama-cpp-src DIR] [--reuse-builds]

Writes a LLaMA folder with seeded random weights in the released shapes (``7b``: Vicuna-7B,
hidden 4096, 32 layers, 32 heads, ffn 11008, vocab 32000 + NExT-GPT's 38 added tokens; ``1b``:
TinyLlama-1.1B's shape with the same vocabulary; ``tiny``: a smoke test) as BF16 safetensors
shards, one shard at a time (a SentencePiece ``tokenizer.model``, as Vicuna ships, plus its
``tokenizer.json``). Then, each in its own process with its wall time and peak RSS (``wait4``):

- omniforge's streaming INT4 build (``omniforge.build`` with ``llm_stream="always"``; for the
  7B folder ``omniforge build FOLDER --out B --precision int4`` routes there by itself when the
  FP32 export does not fit in memory), RTN, block 32, symmetric, accuracy level 4;
- ONNX Runtime GenAI's model builder on the same folder (``-p int4``, block 32, accuracy level 4),
  when ``onnxruntime-genai`` is installed;
- llama.cpp: the sdist's ``convert_hf_to_gguf.py`` (BF16 GGUF) then ``llama_model_quantize``
  to Q4_0, when ``llama-cpp-python`` is installed and ``--llama-cpp-src`` (or
  ``$LLAMA_CPP_SRC``) points at its extracted source distribution.

Decoding (batch 1, greedy, a seeded ``--prompt``-token prompt, ``--new`` tokens): time to first
token and decode tokens/s, every runtime in its own worker process, in interleaved rounds
(``--sequential``: one runtime resident at a time, for machines that cannot hold all three). The
INT4 bandwidth bound is omniforge's INT4 weight bytes read per token over a measured read
bandwidth. The CPU's flags (``lscpu``) and every version are recorded. Results:
``benchmarks/results/real_size.{json,md}`` for ``7b``, ``real_size-<size>.{json,md}`` otherwise.

Each finished build's record (time, peak RSS, size) is kept beside it as ``<peer>-build.json``;
``--reuse-builds`` takes a peer's earlier build and record instead of building it again, so a
build that needs other conditions (GenAI's builder holds the FP32 model in memory: at 7B it needs
swap) can be made in its own run and decoded side by side with the others later.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import genai_greedy, machine, median, read_bandwidth, spread, write_results  # noqa: E402

ADDED_TOKENS = 38  # NExT-GPT's <Img>, </Img>, [IMG0..3], [VID0..23], [AUD0..7]
SIZES = {
    "7b": dict(  # Vicuna-7B (LLaMA-7B)
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000 + ADDED_TOKENS,
        max_position_embeddings=2048,
    ),
    "1b": dict(  # TinyLlama-1.1B
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000 + ADDED_TOKENS,
        max_position_embeddings=2048,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000 + ADDED_TOKENS,
        max_position_embeddings=512,
    ),
}
SHARD_BYTES = 2 << 30
COMPLETE = ".complete"  # written last: a folder without it is rewritten


# ---- the model folder ------------------------------------------------------------------------------


def _tensor_names(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = h // shape["num_attention_heads"]
    kv = shape.get("num_key_value_heads", shape["num_attention_heads"]) * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = x.view(np.uint32)
    u += 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


def _seeded(name_index: int, shape: tuple[int, ...], seed: int, is_norm: bool, rows: slice) -> np.ndarray:
    """Rows ``rows`` of tensor ``name_index``: N(0, 0.02) (HF's init), norms 1 + N(0, 0.02); each
    tensor (and each block of rows) from its own seeded generator, so shards are independent."""
    rng = np.random.default_rng([seed, name_index, rows.start])
    n = (rows.stop - rows.start) * int(np.prod(shape[1:], dtype=np.int64))
    x = rng.standard_normal(n, dtype=np.float32)
    x *= 0.02
    if is_norm:
        x += 1.0
    return x


def _tokenizer(folder: Path, pieces: int = 1000) -> None:
    """A SentencePiece ``tokenizer.model`` trained like LLaMA's on the shipped corpus (unk 0, bos 1,
    eos 2), its slow-tokenizer json files, and the ``tokenizer.json`` omniforge's runtime reads."""
    import io
    from importlib import resources

    import sentencepiece as spm

    from omniforge.importers.tokenizer import convert_tokenizer

    lines = resources.files("omniforge").joinpath("data/corpus.txt").read_text().splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=pieces,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,  # as LLaMA's tokenizer.model: no whitespace-collapsing regex
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    try:
        convert_tokenizer(folder, folder)
    except Exception as exc:  # noqa: BLE001 (sentencepiece's protobuf module refuses some protobuf runtimes)
        print(
            f"omniforge's converter failed ({type(exc).__name__}); writing tokenizer.json directly",
            file=sys.stderr,
        )
        _tokenizer_json(folder, special)


def _tokenizer_json(folder: Path, special: dict) -> None:
    """``tokenizer.json`` of the folder's SentencePiece BPE model, as transformers' LlamaConverter
    writes it, read through ``SentencePieceProcessor`` alone (no protobuf module)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers.convert_slow_tokenizer import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    bpe = models.BPE(vocab, generate_merges(vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(list(special.values()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_seeded_llama(folder: Path, shape: dict, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    """An HF LLaMA folder with seeded random BF16 weights of ``shape``, written shard by shard and
    tensor by tensor (never more than one block of rows in memory); reused when complete."""
    folder = Path(folder)
    if (folder / COMPLETE).is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tensors = _tensor_names(shape)
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, s) in enumerate(tensors):
        nbytes = 2 * int(np.prod(s, dtype=np.int64))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    weight_map, total = {}, 0
    for k, members in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in members:
            name, s = tensors[i]
            n = 2 * int(np.prod(s, dtype=np.int64))
            header[name] = {"dtype": "BF16", "shape": list(s), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)
        with open(folder / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for i in members:
                name, s = tensors[i]
                width = int(np.prod(s[1:], dtype=np.int64))
                step = max(1, (64 << 20) // (4 * width))
                for r in range(0, s[0], step):
                    rows = slice(r, min(r + step, s[0]))
                    f.write(_bf16(_seeded(i, s, seed, "norm" in name, rows)).tobytes())
        total += offset
        print(f"wrote {fname} ({offset / 2**30:.2f} GiB)", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **shape,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": 1, "eos_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _tokenizer(folder)
    (folder / COMPLETE).write_text("")
    return folder


# ---- builds, each in its own process ---------------------------------------------------------------


def run_measured(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run ``cmd``; its wall time, peak RSS (``wait4``) and exit status."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if log:
        out.close()
    res = {
        "seconds": round(seconds, 1),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "returncode": proc.returncode,
    }
    if proc.returncode != 0:
        tail = log.read_text()[-600:] if log else ""
        killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
        res["failed"] = (
            f"exit {proc.returncode}{killed}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        )
    return res


def build_omniforge(folder: Path, work: Path, threads: int) -> dict:
    out = work / "omniforge-int4"
    code = (
        "import sys; from pathlib import Path\n"
        "from omniforge.build import BuildOptions, build\n"
        f"build(Path({str(folder)!r}), Path({str(out)!r}), BuildOptions(precision='int4', "
        f"cache=Path({str(work / 'cache')!r}), llm_stream='always'), log=lambda m: print(m, flush=True))\n"
    )
    shutil.rmtree(work / "cache", ignore_errors=True)  # measure the build, not the cache
    res = run_measured([sys.executable, "-c", code], log=work / "omniforge-build.log")
    if "failed" in res:
        return res
    report = json.loads((out / "stream.json").read_text())
    files = ["llm", "token_embedding"]
    m = json.loads((out / "manifest.json").read_text())
    served = []
    for name in files:
        sb = m["stages"][name]
        v = next(v for v in sb["variants"] if v["role"] in ("ort_inplace_llm", "ort"))
        served += [v["file"], *v["data_files"]]
    res.update(
        {
            "path": str(out),
            "size_bytes": sum((out / f).stat().st_size for f in served),
            "llm_weight_bytes": report["graph_bytes"],
            "stream_report": report,
            "quantize": json.loads((out / "quantize.json").read_text()),
        }
    )
    return res


def build_genai(folder: Path, work: Path, threads: int) -> dict:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return {"skipped": "onnxruntime-genai not installed"}
    out = work / "genai-int4"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(folder),
        "-o",
        str(out),
        "-p",
        "int4",
        "-e",
        "cpu",
        "-c",
        str(work / "genai-cache"),
        "--extra_options",
        "int4_accuracy_level=4",
        "int4_block_size=32",
    ]
    res = run_measured(cmd, log=work / "genai-build.log")
    shutil.rmtree(work / "genai-cache", ignore_errors=True)
    if "failed" in res:
        return res
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    res["path"] = str(out)
    res["size_bytes"] = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    return res


def llama_cpp_src(arg: str | None) -> Path | None:
    for cand in (arg, os.environ.get("LLAMA_CPP_SRC")):
        if not cand:
            continue
        p = Path(cand)
        hits = list(p.glob("vendor/llama.cpp/convert_hf_to_gguf.py")) + list(
            p.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py")
        )
        if hits:
            return hits[0].parent
    return None


def build_llama_cpp(folder: Path, work: Path, threads: int, src: Path | None) -> dict:
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python not installed"}
    if src is None:
        return {"skipped": "no llama.cpp source: extract llama-cpp-python's sdist and pass --llama-cpp-src"}
    bf16, q4 = work / "llama-bf16.gguf", work / "llama-q4_0.gguf"
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    conv = run_measured(
        [
            sys.executable,
            str(src / "convert_hf_to_gguf.py"),
            str(folder),
            "--outfile",
            str(bf16),
            "--outtype",
            "bf16",
        ],
        env=env,
        log=work / "llama-cpp-convert.log",
    )
    if "failed" in conv:
        return conv
    code = (
        "import llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0\n"
        f"p.nthread = {threads}\n"
        f"assert llama_cpp.llama_model_quantize({str(bf16).encode()!r}, {str(q4).encode()!r}, p) == 0\n"
    )
    quant = run_measured([sys.executable, "-c", code], log=work / "llama-cpp-quantize.log")
    if "failed" in quant:
        return quant
    bf16.unlink()
    return {
        "seconds": round(conv["seconds"] + quant["seconds"], 1),
        "convert": conv,
        "quantize": quant,
        "peak_rss_bytes": max(conv["peak_rss_bytes"], quant["peak_rss_bytes"]),
        "path": str(q4),
        "size_bytes": q4.stat().st_size,
    }


# ---- decoding, one worker process per runtime ------------------------------------------------------


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 32000, size=n).tolist()


def runner_omniforge(path: str, threads: int, prompt: int, new: int):
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    rt = LlmRuntime(
        path,
        num_slots=1,
        prefix_cache_entries=0,
        max_context=prompt + new + 8,
        session=SessionConfig(threads=threads),
    )
    ids = prompt_ids(prompt)
    cfg = GenerationConfig(max_new_tokens=new, stop_token_ids=())
    rt.generate(ids, GenerationConfig(max_new_tokens=4, stop_token_ids=()))

    def once() -> tuple[float, float]:
        t0 = time.perf_counter()
        r = rt.generate(ids, cfg)
        assert r.new_tokens == new
        return r.ttft_s, time.perf_counter() - t0

    once.info = {"backend": rt.backend}  # the decode loop LlmRuntime's auto rule chose
    return once


def runner_genai(path: str, threads: int, prompt: int, new: int):
    import onnxruntime_genai as og

    model = og.Model(path)
    ids = prompt_ids(prompt)

    return genai_greedy(model, ids, new)


def runner_llama_cpp(path: str, threads: int, prompt: int, new: int):
    from llama_cpp import Llama

    llm = Llama(
        model_path=path,
        n_ctx=prompt + new + 8,
        n_batch=prompt,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    import llama_cpp

    ids = prompt_ids(prompt)
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # the last evaluated row (eval keeps no scores without logits_all)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    def gen(n: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        ttft = 0.0
        for step in range(n):
            tok = int(np.argmax(last_logits()))  # greedy, a Python argmax per token
            if step == 0:
                ttft = time.perf_counter() - t0
            if step < n - 1:
                llm.eval([tok])
        return ttft, time.perf_counter() - t0

    gen(4)
    return lambda: gen(new)


RUNNERS = {"omniforge": runner_omniforge, "genai": runner_genai, "llamacpp": runner_llama_cpp}


class Worker:
    def __init__(self, kind: str, path: str, args: argparse.Namespace) -> None:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--worker-path",
            path,
            "--threads",
            str(args.threads),
        ]
        cmd += ["--prompt", str(args.prompt), "--new", str(args.new)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().strip()
        self.info = json.loads(first[len("ready") :] or "{}") if first.startswith("ready") else {}
        if not first.startswith("ready"):
            code = self.proc.wait()
            why = {-4: " (illegal instruction: a build for another CPU)", -9: " (killed: out of memory?)"}
            raise RuntimeError(f"the {kind} worker exited with {code}{why.get(code, '')}")

    def run(self) -> tuple[float, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return tuple(json.loads(self.proc.stdout.readline()))

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        _, _, usage = os.wait4(self.proc.pid, 0)
        return usage.ru_maxrss * 1024


def worker_main(args: argparse.Namespace) -> None:
    fn = RUNNERS[args.worker](args.worker_path, args.threads, args.prompt, args.new)
    print("ready", json.dumps(getattr(fn, "info", {})), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(fn()), flush=True)


def decode(paths: dict[str, str], args: argparse.Namespace) -> dict:
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
    rss: dict[str, int] = {}
    info: dict[str, dict] = {}  # what a worker reports of itself (omniforge: its decode loop)
    failed: dict[str, str] = {}

    def start(kind: str, path: str) -> Worker | None:
        try:
            return Worker(kind, path, args)
        except RuntimeError as exc:
            failed[kind] = str(exc)
            samples.pop(kind)
            return None

    if args.sequential:
        for kind, path in paths.items():
            w = start(kind, path)
            if w is None:
                continue
            for _ in range(args.runs):
                samples[kind].append(w.run())
            info[kind] = w.info
            rss[kind] = w.close()
    else:
        started = {k: start(k, p) for k, p in paths.items()}
        workers = {k: w for k, w in started.items() if w is not None}
        for r in range(args.runs):
            print(f"round {r + 1}/{args.runs} ...", file=sys.stderr)
            for kind, w in workers.items():
                time.sleep(0.5)
                w.run()  # warm again after the others ran
                samples[kind].append(w.run())
        info.update({k: w.info for k, w in workers.items()})
        rss = {k: w.close() for k, w in workers.items()}
    out: dict[str, dict] = {k: {"failed": why} for k, why in failed.items()}
    for kind, s in samples.items():
        ttft = [a for a, _ in s]
        dec = [(args.new - 1) / max(b - a, 1e-9) for a, b in s]
        out[kind] = {
            "ttft_ms": median(ttft) * 1000,
            "decode_tok_s": median(dec),
            "spread": spread([b - a for a, b in s]),
            "worker_peak_rss_bytes": rss[kind],
            **info.get(kind, {}),
        }
    return out


def cpu_flags() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = info.get("Flags", "").split()
    wanted = (
        "avx2",
        "fma",
        "f16c",
        "avx_vnni",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512_bf16",
        "amx_bf16",
        "amx_int8",
    )
    return {
        "model": info.get("Model name", "").strip(),
        "cpus": info.get("CPU(s)", "").strip(),
        "has": {f: f in flags for f in wanted},
        "flags": flags,
    }


def cpu_features(cpu: dict) -> str:
    """The instruction sets ``cpu_flags`` found, as one line for a report."""
    return ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu.get("has", {}).items())


def versions() -> dict:
    out = {}
    for pkg in ("onnxruntime", "onnxruntime-genai", "llama-cpp-python", "numpy", "torch", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


GIB = 2**30
NAMES = {"omniforge": "omniforge INT4", "genai": "ONNX Runtime GenAI INT4", "llamacpp": "llama.cpp Q4_0"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    ap.add_argument("--work", default="/tmp/omniforge-bench/real-size")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--sequential", action="store_true", help="one runtime resident at a time")
    ap.add_argument("--skip", default="", help="comma-separated peers to leave out: genai, llamacpp")
    ap.add_argument("--llama-cpp-src", help="llama-cpp-python's extracted sdist (for convert_hf_to_gguf.py)")
    ap.add_argument(
        "--reuse-builds", action="store_true", help="take each peer's earlier build where one is kept"
    )
    ap.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        worker_main(args)
        return
    skip = {s for s in args.skip.split(",") if s}
    shape = SIZES[args.size]
    work = Path(args.work) / args.size
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder = write_seeded_llama(work / "llama", shape)
    write_s = time.perf_counter() - t0
    print(f"model folder: {folder} ({write_s:.0f}s)", file=sys.stderr)
    makers = {
        "omniforge": ("omniforge streaming INT4", lambda: build_omniforge(folder, work, args.threads)),
        "genai": ("ONNX Runtime GenAI INT4", lambda: build_genai(folder, work, args.threads)),
        "llamacpp": (
            "llama.cpp Q4_0",
            lambda: build_llama_cpp(folder, work, args.threads, llama_cpp_src(args.llama_cpp_src)),
        ),
    }
    builds = {}
    for peer, (what, make) in makers.items():
        if peer in skip:
            continue
        record = work / f"{peer}-build.json"
        if args.reuse_builds and record.is_file():
            earlier = json.loads(record.read_text())
            if Path(earlier.get("path", "/nonexistent")).exists():
                print(f"{what} build: reusing {earlier['path']}", file=sys.stderr)
                builds[peer] = {**earlier, "reused": True}
                continue
        print(f"{what} build ...", file=sys.stderr)
        builds[peer] = make()
        if "path" in builds[peer]:
            record.write_text(json.dumps(builds[peer], indent=2) + "\n")
    paths = {k: b["path"] for k, b in builds.items() if "path" in b}
    print(f"decoding ({', '.join(paths)}) ...", file=sys.stderr)
    results = decode(paths, args) if paths else {}
    bw = read_bandwidth(args.threads)
    o = builds.get("omniforge", {})
    bound = bw / o["llm_weight_bytes"] if "llm_weight_bytes" in o else None
    params = sum(int(np.prod(s)) for _, s in _tensor_names(shape))
    data = {
        "machine": machine(),
        "cpu": cpu_flags(),
        "versions": versions(),
        "settings": {
            "size": args.size,
            "shape": shape,
            "parameters": params,
            "prompt": args.prompt,
            "new_tokens": args.new,
            "runs": args.runs,
            "threads": args.threads,
            "interleaved": not args.sequential,
        },
        "model_folder_write_s": round(write_s, 1),
        "builds": builds,
        "decode": results,
        "read_bandwidth_GBps": bw / 1e9,
        "int4_bound_tok_s": bound,
    }
    if "decode_tok_s" in results.get("omniforge", {}):
        for k, r in results.items():
            if "failed" in r:
                continue
            if k != "omniforge":
                r["omniforge_vs_this"] = results["omniforge"]["decode_tok_s"] / r["decode_tok_s"]
            if bound:
                r["fraction_of_int4_bound"] = r["decode_tok_s"] / bound
    cpu = data["cpu"]
    has = cpu_features(cpu)
    lines = [
        f"# Real size ({args.size}): INT4 build and decode, omniforge vs ONNX Runtime GenAI vs llama.cpp",
        "",
        f"Seeded random BF16 weights in the shape {json.dumps(shape)} ({params / 1e9:.2f}B parameters). "
        f"Machine: {cpu.get('model') or data['machine'].get('cpu', '?')}, {args.threads} threads; {has}. "
        f"Batch 1, greedy, prompt {args.prompt}, {args.new} new tokens, median of {args.runs} runs"
        f"{', interleaved' if not args.sequential else ', one runtime at a time'}.",
        "",
        "| | build time (s) | build peak RSS (GiB) | model size (GiB) | time to first token (ms) | decode tok/s | decode spread | runtime peak RSS (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, b in builds.items():
        r = results.get(k, {})
        if "failed" in r:
            b = {**b, "failed": f"built in {b['seconds']:.0f}s; decode: {r['failed']}"}
        if "skipped" in b or "failed" in b:
            lines.append(f"| {NAMES[k]} | {b.get('skipped') or b.get('failed')} | | | | | | |")
            continue
        lines.append(
            f"| {NAMES[k]}{' (built in an earlier run)' if b.get('reused') else ''} | {b['seconds']:.0f} | {b['peak_rss_bytes'] / GIB:.2f} | {b['size_bytes'] / GIB:.2f} | "
            f"{r.get('ttft_ms', float('nan')):.0f} | {r.get('decode_tok_s', float('nan')):.2f} | "
            f"{r.get('spread', float('nan')):.0%} | {r.get('worker_peak_rss_bytes', 0) / GIB:.2f} |"
        )
    lines.append("")
    for k, b in builds.items():
        if b.get("note"):
            lines.append(f"- {NAMES[k]} build: {b['note']}.")
    if bound:
        lines.append(
            f"- INT4 bandwidth bound: omniforge's {o['llm_weight_bytes'] / GIB:.2f} GiB of INT4 weights read per token "
            f"over a measured {bw / 1e9:.1f} GB/s = **{bound:.2f} tok/s**."
        )
    for k, r in results.items():
        if "failed" in r:
            continue
        extra = f"; omniforge / this: **{r['omniforge_vs_this']:.2f}x**" if "omniforge_vs_this" in r else ""
        frac = (
            f"{100 * r['fraction_of_int4_bound']:.0f}% of the INT4 bound"
            if "fraction_of_int4_bound" in r
            else ""
        )
        loop = f" ({r['backend']} decode loop)" if "backend" in r else ""
        lines.append(f"- {NAMES[k]}{loop}: {r['decode_tok_s']:.2f} tok/s, {frac}{extra}.")
    if "stream_report" in o:
        s = o["stream_report"]
        lines.append(
            f"- omniforge's streaming build: {s['seconds']['total']:.0f}s in-process, peak RSS "
            f"{s['peak_rss_total_bytes'] / GIB:.2f} GiB ({s['peak_rss_write_bytes'] / GIB:.2f} GiB while writing), "
            f"{s['bytes_read'] / GIB:.2f} GiB read from the shards; {s['canonical']}."
        )
        q = {r["stage"]: r for r in o["quantize"]}
        m = q["llm"]["metrics"]
        lines.append(
            f"- INT4 vs the FP32 layer-by-layer reference (seeded rows): top-1 {m['top1_agreement']:.2f}, "
            f"logits cosine {m['logits_cosine']:.4f} (random weights: see docs/quantization.md)."
        )
    name = "real_size" if args.size == "7b" else f"real_size-{args.size}"
    j, m = write_results(name, data, "\n".join(lines))
    print("\n".join(lines))
    print(f"\nwritten: {j}, {m}", file=sys.stderr)


if __name__ == "__main__":
    main()

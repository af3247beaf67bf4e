#!/usr/bin/env bash
# The TensorRT path on a real GPU (docs/tensorrt.md, "Verified on hardware"), sized for about 10
# minutes on one datacenter GPU with TensorRT installed (installing it adds its download):
#   1. the GPU, and TensorRT within TRT_RANGE (installed from PyPI when missing, unless told not to);
#   2. builds in dependency order: the FP32 ONNX Runtime reference (export + optimize fill the
#      shared cache), then fp16 and int8 with --backend tensorrt side by side, then int4 (it reuses
#      int8's calibration capture); each also emits trtexec/build_engines.sh for this TensorRT;
#   3. each emitted build_engines.sh, in a copy of its build (its engines/ would overwrite the ones
#      the manifest lists);
#   4. one Python pass: check-trt on each build; every stage of every TensorRT build against the FP32
#      ONNX Runtime build (the LLM through its engine); every engine, Polygraphy- or trtexec-built,
#      against ONNX Runtime running the graph it was built from; each engine's latency against the
#      same stage in PyTorch eager on the GPU;
#   5. one result: $RESULTS/gpu_check.json and gpu_check.md; exit 0 only when every step ran and passed.
# Not yet run on a GPU. The CPU part was timed on a busy 2-core machine: the FP32 build 4 min, the
# INT8 quantization 5 min (the three UNets' fallback search most of it), INT4 then seconds (every
# other stage's INT8 is reused); a 16-core GPU host should take a fraction of that, plus 45 engine
# builds by Polygraphy and 45 by trtexec. Every step has a timeout, so the script always reports.
#
# usage: scripts/gpu_check.sh [WORKDIR]            (default /tmp/omniforge-gpu-check)
#   TRT_RANGE=">=10.12,<12"      TensorRT versions this check accepts (strongly typed builds)
#   GPU_CHECK_NO_INSTALL=1       never pip install: stop when TensorRT is missing or out of range
#   GPU_CHECK_CPU_BENCH=1        afterwards, the CPU benchmarks in dependency order (outside the 10 min)
#   RESULTS=benchmarks/results   where gpu_check.json / gpu_check.md are written
#   TRTEXEC=/path/to/trtexec     default: trtexec on PATH, else /usr/src/tensorrt/bin/trtexec
#   PYTHON=/path/to/python       default: python3 on PATH, else python (the one with omniforge's
#                                dependencies and a CUDA build of torch)
# TensorRT and Polygraphy come from PyPI when missing: a host that cannot reach it needs both
# installed first (TensorRT's wheels are about a gigabyte). omniforge runs from this checkout
# (python -m omniforge in its root), installed or not.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-/tmp/omniforge-gpu-check}"
results="${RESULTS:-benchmarks/results}"
trt_range="${TRT_RANGE:->=10.12,<12}"
py="${PYTHON:-$(command -v python3 || command -v python || true)}"
[ -n "$py" ] || { echo "gpu_check: no python3 or python on PATH (set PYTHON)" >&2; exit 1; }
mkdir -p "$work" "$results"
work="$(cd "$work" && pwd)"
export OMNIFORGE_HOME="$work/home" # a cache of its own: the export runs once, every build reuses it
steps="$work/steps.tsv"            # one line per step: name, status, seconds, log
: >"$steps"
start=$SECONDS

record() { # record NAME STATUS SECONDS LOG
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$steps"
  echo "   $1: $2 in $3 s (log: $4)"
}

step() { # step NAME TIMEOUT_S CMD...: run one step, time it, record it; never stops the script
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc=0
  echo "== $name"
  timeout "$limit" "$@" >"$work/$name.log" 2>&1 || rc=$?
  local status=ok
  if [ "$rc" -eq 124 ]; then
    status="timed out after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    status="failed (exit $rc)"
  fi
  record "$name" "$status" "$((SECONDS - t0))" "$work/$name.log"
}

wait_for() { # wait_for NAME PID T0: record a step started in the background
  local rc=0
  wait "$2" || rc=$?
  local status=ok
  if [ "$rc" -eq 124 ]; then status="timed out"; elif [ "$rc" -ne 0 ]; then status="failed (exit $rc)"; fi
  record "$1" "$status" "$((SECONDS - $3))" "$work/$1.log"
}

# ---- 1. the GPU and TensorRT -------------------------------------------------------------------
gpu="$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)"
if [ -z "$gpu" ]; then
  echo "gpu_check: no NVIDIA GPU is visible (nvidia-smi found none); this check needs one" >&2
  exit 1
fi
cuda_major="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9][0-9]*\)\..*/\1/p' | head -n 1)"
echo "GPU: $gpu (driver's CUDA ${cuda_major:-unknown})"

trt_in_range() { # prints the installed version; exit 0 when it is within TRT_RANGE
  "$py" - "$trt_range" <<'PY'
import sys

try:
    from packaging.specifiers import SpecifierSet
except ImportError:
    from pip._vendor.packaging.specifiers import SpecifierSet
try:
    import tensorrt
except ImportError:
    print("none")
    sys.exit(1)
print(tensorrt.__version__)
sys.exit(0 if SpecifierSet(sys.argv[1]).contains(tensorrt.__version__) else 1)
PY
}

if ! installed="$(trt_in_range)"; then
  if [ "${GPU_CHECK_NO_INSTALL:-0}" = 1 ] || [ -z "$cuda_major" ]; then
    echo "gpu_check: TensorRT $installed is not within '$trt_range' (GPU_CHECK_NO_INSTALL or unknown CUDA)" >&2
    exit 1
  fi
  echo "== installing tensorrt-cu${cuda_major}${trt_range} (found: $installed)"
  "$py" -m pip install --quiet "tensorrt-cu${cuda_major}${trt_range}" "polygraphy>=0.49" || {
    echo "gpu_check: pip could not install tensorrt-cu${cuda_major}${trt_range} (no route to PyPI?); install TensorRT and Polygraphy first" >&2
    exit 1
  }
  installed="$(trt_in_range)" || {
    echo "gpu_check: TensorRT $installed is still not within '$trt_range'" >&2
    exit 1
  }
fi
if ! "$py" -c "import polygraphy" 2>/dev/null; then
  [ "${GPU_CHECK_NO_INSTALL:-0}" = 1 ] && { echo "gpu_check: Polygraphy is not installed" >&2; exit 1; }
  "$py" -m pip install --quiet "polygraphy>=0.49" || {
    echo "gpu_check: pip could not install Polygraphy (no route to PyPI?); install it first" >&2
    exit 1
  }
fi
"$py" -c "import omniforge, torch, transformers" || {
  echo "gpu_check: $py cannot import omniforge and its export dependencies (pip install -e \".[export,gpu]\")" >&2
  exit 1
}
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  echo "gpu_check: this torch has no CUDA; eager latency will be missing and the check will not pass" >&2
trt_mm="$("$py" -c "import tensorrt as t; print('.'.join(t.__version__.split('.')[:2]))")"
echo "TensorRT $installed"
trtexec="${TRTEXEC:-$(command -v trtexec || true)}"
if [ -z "$trtexec" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then trtexec=/usr/src/tensorrt/bin/trtexec; fi

# ---- 2. builds, in dependency order ------------------------------------------------------------
# shellcheck disable=SC2317  # called through `bash -c` (exported), so under `timeout`
trt_build() { # trt_build PRECISION: engines for this TensorRT, and the trtexec script for it
  "$py" -m omniforge build --out "$work/trt-$1" --backend tensorrt --precision "$1" --emit-trtexec --trt-version "$trt_mm"
}
export -f trt_build
export work trt_mm py
step build-ort-fp32 300 "$py" -m omniforge build --out "$work/ort-fp32"
t0=$SECONDS
timeout 420 bash -c 'trt_build fp16' >"$work/build-trt-fp16.log" 2>&1 & # no calibration: runs beside int8
fp16_pid=$!
step build-trt-int8 420 bash -c 'trt_build int8'
wait_for build-trt-fp16 "$fp16_pid" "$t0"
step build-trt-int4 420 bash -c 'trt_build int4' # after int8: reuses its calibration capture

# ---- 3. the emitted trtexec scripts ------------------------------------------------------------
if [ -n "$trtexec" ]; then
  pids=()
  t0=$SECONDS
  for p in fp16 int8 int4; do
    [ -f "$work/trt-$p/trtexec/build_engines.sh" ] || continue
    rm -rf "$work/trtexec-$p"
    cp -a "$work/trt-$p" "$work/trtexec-$p"
    rm -rf "$work/trtexec-$p/engines"
    PATH="$(dirname "$trtexec"):$PATH" timeout 420 bash "$work/trtexec-$p/trtexec/build_engines.sh" \
      >"$work/trtexec-$p.log" 2>&1 &
    pids+=("$p:$!")
  done
  for entry in ${pids[@]+"${pids[@]}"}; do wait_for "trtexec-${entry%%:*}" "${entry#*:}" "$t0"; done
else
  record trtexec "not run: no trtexec (set TRTEXEC, or install TensorRT's tarball or container)" 0 -
fi

# ---- 4 and 5. comparisons, latency, the result -------------------------------------------------
rc=0
timeout 600 "$py" - "$work" "$results" "$steps" "$gpu" "$((SECONDS - start))" <<'PY' || rc=$?
"""Comparisons and timings of the builds above; writes gpu_check.json / .md and exits non-zero
unless every step ran and passed."""

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

work, results, steps_file = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
gpu_line, elapsed_before = sys.argv[4], int(sys.argv[5])
t_start = time.perf_counter()
PRECISIONS = ("fp16", "int8", "int4")
# TensorRT build vs the FP32 ONNX Runtime build (quantization included): worst output cosine
VS_FP32 = {"fp16": 0.999, "int8": 0.98, "int4": 0.98}
# an engine vs ONNX Runtime on the graph it was built from (TensorRT's own error), by its precision
VS_SOURCE = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.99, "int8": 0.99, "int4": 0.995}

import onnxruntime as ort  # noqa: E402
import tensorrt as trt  # noqa: E402

from omniforge.build import tensorrt_source  # noqa: E402
from omniforge.calibration.metrics import cosine  # noqa: E402
from omniforge.engines.compare import compare_builds  # noqa: E402
from omniforge.engines.tensorrt import load_engine_checked, polygraphy_trt  # noqa: E402
from omniforge.engines.trt_check import check_build  # noqa: E402
from omniforge.pipeline.manifest import load_manifest  # noqa: E402

report = {
    "machine": {
        "gpu": gpu_line,
        "tensorrt": trt.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    },
    "steps": [],
    "check_trt": {},
    "vs_fp32": {},
    "vs_source": [],
    "latency": [],
    "problems": [],
}
for line in steps_file.read_text().splitlines():
    name, status, seconds, log = line.split("\t")
    report["steps"].append({"step": name, "status": status, "seconds": int(seconds), "log": log})
    if status != "ok":
        report["problems"].append(f"step {name}: {status}")


def guarded(what, fn, *args):
    """``fn(*args)``, or None with the error recorded (the other measurements go on)."""
    try:
        return fn(*args)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        report["problems"].append(f"{what}: {type(exc).__name__}: {first}")
        return None


major_minor = tuple(int(x) for x in trt.__version__.split(".")[:2])
rules = "11" if major_minor >= (11, 0) else "10.12"
fp32 = work / "ort-fp32"
builds = {p: work / f"trt-{p}" for p in PRECISIONS if (work / f"trt-{p}" / "manifest.json").is_file()}
report["problems"] += [f"build trt-{p}: no build was written" for p in PRECISIONS if p not in builds]

# check-trt: the graphs each build handed TensorRT, against this version's rules
for p, b in builds.items():
    found = guarded(f"check-trt {p}", check_build, b, [rules])
    if found is not None:
        bad = [f"{f.stage}: {v.node} {v.rule}: {v.message}" for f in found for v in f.violations]
        report["check_trt"][p] = {"rules": rules, "violations": bad}
        report["problems"] += [f"check-trt {p}: {x}" for x in bad]

# every stage of every TensorRT build against the FP32 ONNX Runtime build
for p, b in builds.items():
    rows = guarded(f"compare {p}", compare_builds, fp32, b, 1.0, 1.0)
    for r in rows or []:
        ok = r.cosine >= VS_FP32[p]
        report["vs_fp32"].setdefault(p, []).append(
            {"stage": r.stage, "precision": r.precision_b, "max_abs": r.max_abs, "cosine": r.cosine, "ok": ok}
        )
        if not ok:
            report["problems"].append(f"{p} {r.stage} vs FP32: cosine {r.cosine:.5f} < {VS_FP32[p]}")


def ort_outputs(graph, feeds):
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return [dict(zip([o.name for o in sess.get_outputs()], sess.run(None, f), strict=True)) for f in feeds]


def trt_outputs(engine, feeds):
    with polygraphy_trt.TrtRunner(engine) as runner:
        return [{k: np.asarray(v) for k, v in runner.infer(f).items()} for f in feeds]


def against_source(kind, p, b, m, name, engine):
    sb = m.stage_build(name)
    graph, precision = tensorrt_source(sb, trt.__version__)
    spec = m.pipeline.stage(name)
    feeds = [spec.sample_inputs(pt, seed=500 + i) for i, pt in enumerate(spec.parity_points())]
    ref, got = ort_outputs(b / graph, feeds), trt_outputs(engine, feeds)
    cos = min(cosine(r[k], g[k]) for r, g in zip(ref, got, strict=True) for k in r if r[k].size)
    err = max(
        float(np.max(np.abs(r[k] - g[k]))) for r, g in zip(ref, got, strict=True) for k in r if r[k].size
    )
    ok = cos >= VS_SOURCE[precision]
    report["vs_source"].append(
        {
            "engine": kind,
            "build": p,
            "stage": name,
            "graph": graph,
            "precision": precision,
            "cosine": cos,
            "max_abs": err,
            "ok": ok,
        }
    )
    if not ok:
        report["problems"].append(
            f"{kind} engine {p}/{name} vs {graph}: cosine {cos:.5f} < {VS_SOURCE[precision]}"
        )


# every engine against ONNX Runtime on the graph it was built from
for p, b in builds.items():
    m = load_manifest(b)
    for name in m.stages:
        engine = guarded(f"load {p}/{name}", load_engine_checked, b, m, name)
        if engine is not None:
            guarded(f"polygraphy engine {p}/{name}", against_source, "polygraphy", p, b, m, name, engine)
        plan = work / f"trtexec-{p}" / "engines" / f"{name}.plan"
        if plan.is_file():
            plan_engine = guarded(
                f"trtexec plan {p}/{name}", polygraphy_trt.engine_from_bytes, plan.read_bytes()
            )
            if plan_engine is not None:
                guarded(f"trtexec engine {p}/{name}", against_source, "trtexec", p, b, m, name, plan_engine)
        elif (work / f"trtexec-{p}").is_dir():
            report["problems"].append(f"trtexec engine {p}/{name}: build_engines.sh wrote no plan")

# latency: each engine against the same stage in PyTorch eager, on the GPU, at the opt shapes
import torch  # noqa: E402

if not torch.cuda.is_available():
    report["problems"].append("latency: this torch has no CUDA (install a CUDA build of torch to time eager)")
else:
    from omniforge.export.stages import export_module
    from omniforge.model.loader import load_component
    from omniforge.model.tiny import ensure_default
    from omniforge.pipeline.describe import describe
    from omniforge.pipeline.model_config import load_model_config

    cfg = load_model_config(ensure_default())
    spec_of = {s.name: s for s in describe(cfg).stages}
    TORCH = {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float16): torch.float16,
        np.dtype(np.int64): torch.int64,
        np.dtype(np.int32): torch.int32,
        np.dtype(np.bool_): torch.bool,
    }

    def timed(fn, runs=50, warmup=5):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(runs):
            a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            z.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(z))
        return float(np.median(out))

    def engine_call(engine, feeds):
        ctx = engine.create_execution_context()
        keep = [engine, ctx]  # alive as long as the call is
        for name, arr in feeds.items():
            t = torch.from_numpy(np.ascontiguousarray(arr)).cuda()
            ctx.set_input_shape(name, tuple(arr.shape))
            ctx.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                dtype = TORCH[np.dtype(trt.nptype(engine.get_tensor_dtype(name)))]
                t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device="cuda")
                ctx.set_tensor_address(name, t.data_ptr())
                keep.append(t)
        stream = torch.cuda.current_stream().cuda_stream
        return lambda: ctx.execute_async_v3(stream), keep

    def eager_module(spec):
        adapter = cfg.merge_adapter if spec.component == "llm" else None
        return export_module(spec, load_component(cfg, spec.component, adapter)).eval().cuda()

    def eager_ms(module, args, autocast):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            return timed(lambda: module(*args))

    manifests = {p: load_manifest(b) for p, b in builds.items()}
    for name, spec in spec_of.items():
        feeds = spec.sample_inputs("opt", seed=7)
        row = {"stage": name}
        module = guarded(f"eager {name}", eager_module, spec)
        if module is not None:
            args = [torch.from_numpy(feeds[n]).cuda() for n in spec.input_names]
            row["eager_fp32_ms"] = guarded(f"eager {name}", eager_ms, module, args, False)
            row["eager_autocast_fp16_ms"] = guarded(f"eager fp16 {name}", eager_ms, module, args, True)
            del module, args
        for p, b in builds.items():
            engine = guarded(f"load {p}/{name}", load_engine_checked, b, manifests[p], name)
            call = None if engine is None else guarded(f"bind {p}/{name}", engine_call, engine, feeds)
            if call is not None:
                ms = row[f"trt_{p}_ms"] = guarded(f"time {p}/{name}", timed, call[0])
                if ms and row.get("eager_fp32_ms"):
                    row[f"trt_{p}_speedup_vs_eager"] = row["eager_fp32_ms"] / ms
        report["latency"].append(row)
        torch.cuda.empty_cache()

report["seconds"] = elapsed_before + round(time.perf_counter() - t_start)
report["passed"] = not report["problems"]
results.mkdir(parents=True, exist_ok=True)
(results / "gpu_check.json").write_text(json.dumps(report, indent=2, default=float) + "\n")


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


md = [
    "# GPU check (scripts/gpu_check.sh)",
    "",
    f"GPU {gpu_line}; TensorRT {trt.__version__}; ONNX Runtime {ort.__version__}; "
    f"{report['seconds']} s in all; **{'passed' if report['passed'] else 'NOT passed'}**.",
    "",
    "## Steps",
    "",
    "| step | status | s |",
    "|---|---|---:|",
    *[f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in report["steps"]],
    "",
    f"## TensorRT builds vs the FP32 ONNX Runtime build (worst output cosine; pass at {VS_FP32})",
    "",
    "| build | stage | precision | cosine | max abs | ok |",
    "|---|---|---|---:|---:|---|",
    *[
        f"| {p} | {r['stage']} | {r['precision']} | {r['cosine']:.5f} | {r['max_abs']:.2e} | {'yes' if r['ok'] else 'NO'} |"
        for p, rows in report["vs_fp32"].items()
        for r in rows
    ],
    "",
    f"## Engines vs ONNX Runtime on the graph they were built from (pass at {VS_SOURCE})",
    "",
    "| engine | build | stage | graph | cosine | max abs | ok |",
    "|---|---|---|---|---:|---:|---|",
    *[
        f"| {r['engine']} | {r['build']} | {r['stage']} | {r['graph']} | {r['cosine']:.5f} | {r['max_abs']:.2e} | {'yes' if r['ok'] else 'NO'} |"
        for r in report["vs_source"]
    ],
    "",
    "## Latency at the opt shapes (ms, median of 50; PyTorch eager on the same GPU)",
    "",
    "| "
    + " | ".join(["stage", "eager fp32", "eager autocast fp16", *(f"TensorRT {p} (x eager)" for p in builds)])
    + " |",
    "|---|---:|---:|" + "---:|" * len(builds),
    *[
        "| "
        + " | ".join(
            [
                r["stage"],
                fmt(r.get("eager_fp32_ms")),
                fmt(r.get("eager_autocast_fp16_ms")),
                *(f"{fmt(r.get(f'trt_{p}_ms'))} ({fmt(r.get(f'trt_{p}_speedup_vs_eager'), '.2f')}x)" for p in builds),
            ]
        )
        + " |"
        for r in report["latency"]
    ],
    "",
    "## Problems",
    "",
    *([f"- {x}" for x in report["problems"]] or ["none"]),
]
(results / "gpu_check.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if report["passed"] else 1)
PY
echo "gpu_check: result in $results/gpu_check.md ($((SECONDS - start)) s; builds and logs in $work)"

# ---- 6. optional: the CPU benchmarks, graph_passes.py after the decode benchmark it reads -----------
if [ "${GPU_CHECK_CPU_BENCH:-0}" = 1 ]; then
  "$py" benchmarks/llm_decode.py --work "$work/bench" --runs 5
  "$py" benchmarks/graph_passes.py --work "$work/bench"
fi
exit "$rc"

#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and TensorRT (pip install tensorrt from NVIDIA's index),
# build the default pipeline with the TensorRT backend, compare every stage against ONNX Runtime,
# and run the latency benchmarks. Usage: scripts/gpu_check.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-/tmp/omniforge-gpu-check}"
mkdir -p "$work"
python -c "import tensorrt; print('TensorRT', tensorrt.__version__)"
nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader
omniforge build --out "$work/ort" --backend onnxruntime
omniforge build --out "$work/trt" --backend tensorrt --emit-trtexec
# FP16 engines against the FP32 ONNX Runtime build, stage by stage
omniforge compare "$work/ort" "$work/trt" --atol 5e-2 --rtol 5e-2
# explicit INT8 (static Q/DQ decoders) and INT4 (block-wise DequantizeLinear LLM) engines
omniforge build --out "$work/trt-int4" --backend tensorrt --precision int4
omniforge compare "$work/ort" "$work/trt-int4" --atol 2e-1 --rtol 2e-1
python benchmarks/graph_passes.py --work "$work/bench"
python benchmarks/llm_decode.py --work "$work/bench" --runs 5
echo "GPU check passed; TensorRT engines and trtexec lines are in $work/trt"

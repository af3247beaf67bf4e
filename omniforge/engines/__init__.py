"""Engine builders: ONNX Runtime (everywhere) and TensorRT through Polygraphy (NVIDIA GPUs)."""

"""Export every stage of a pipeline to ONNX and check parity against PyTorch."""

"""Graph passes over ONNX: small functions over onnx-ir models, each proven by a parity check."""

"""The torch-free runtime: what a service embeds (numpy + onnxruntime + tokenizers only)."""

"""Readers for checkpoints as their authors released them (NExT-GPT's delta, pickled Vicuna shards), rewritten as safetensors folders."""

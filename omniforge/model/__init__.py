"""PyTorch side: the NExT-GPT modules, the tiny default model and loading of model folders.

Importing this package imports torch; the runtime never does.
"""

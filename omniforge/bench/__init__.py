"""``omniforge bench``: latency per stage and end to end, LLM metrics, memory, side by side with PyTorch."""

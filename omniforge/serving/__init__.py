"""Serving a build: Triton model repositories (`omniforge triton`) and a real `tritonserver` (`omniforge serve`)."""

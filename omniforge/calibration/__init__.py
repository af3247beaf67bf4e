"""Calibration and quantization: weight-only INT4/INT8 for the LLM, accuracy reports."""

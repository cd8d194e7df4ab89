"""Inference: sampling, the KV-cached generation Engine, quantized weights."""

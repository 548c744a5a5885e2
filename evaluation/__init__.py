"""Judging a quantized model against its floating-point original."""

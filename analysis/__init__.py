"""Algorithms that need a model and data, above the quantization math (docs/design.md §2): layer sensitivity
(sensitivity.py), the sensitivity-driven layer choice behind `quant.keep_sensitive=auto` (layer_choice.py),
PTQD's noise statistics measured on FP trajectories (noise_statistics.py) and the step-aware precision plan
(step_bits.py)."""

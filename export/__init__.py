"""The folders qdistill writes and reads back (export/formats.py): saved quantized models
(export/quantized.py) and PTQ-ready exports with packed integer weights (export/packed.py, docs/design.md §5)."""
from ..errors import CheckpointError, ExportError
from .packed import (EXPORT_FILE, NOISE_CORRECTION_FILE, export_model, load_exported, load_noise_correction,
                     read_export_meta)
from .onnx_qdq import OnnxDenoiser, export_onnx
from .quantized import load_quantized, read_quantized_meta, save_quantized

__all__ = ["EXPORT_FILE", "NOISE_CORRECTION_FILE", "CheckpointError", "ExportError", "export_model", "load_exported",
           "load_noise_correction", "load_quantized", "OnnxDenoiser", "export_onnx", "read_export_meta", "read_quantized_meta", "save_quantized"]

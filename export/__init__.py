"""PTQ-ready exports: packed integer weights and everything needed to run them (DESIGN.md §5)."""
from .folder import (EXPORT_FILE, NOISE_CORRECTION_FILE, ExportError, export_model, load_exported,
                     load_noise_correction, read_export_meta)

__all__ = ["EXPORT_FILE", "NOISE_CORRECTION_FILE", "ExportError", "export_model", "load_exported",
           "load_noise_correction", "read_export_meta"]

"""The math of qdistill: quantizers, temporal tables, Weight Dilation, quantized layers, model surgery,
block discovery. No I/O, no distributed code."""
from .attention import QuantAttnProcessor
from .blocks import Block, block_output, find_blocks
from .corrected_scheduler import NoiseCorrectedScheduler, StepNoise
from .dilation import dilate_weight, dilation_factors
from .layers import QUANT_LAYERS, LayerSpec, QuantConv2d, QuantLinear
from .noise_correction import NoiseCorrection, NoiseMoments, estimate_noise_correction
from .quantize import QuantConfig, bits_tag, fit_ranges_, quantize_, set_quantization, shortcut_splits
from .routing import set_timesteps
from .temporal import TemporalQuantizer
from .uniform import UniformQuantizer, fake_quant, qrange, search_range

__all__ = [
    "Block", "QUANT_LAYERS", "block_output", "LayerSpec", "NoiseCorrectedScheduler", "NoiseCorrection", "NoiseMoments",
    "QuantAttnProcessor", "QuantConfig", "QuantConv2d", "QuantLinear", "StepNoise",
    "TemporalQuantizer", "UniformQuantizer", "bits_tag", "fit_ranges_", "dilate_weight", "dilation_factors",
    "estimate_noise_correction", "fake_quant", "find_blocks", "qrange", "quantize_",
    "search_range", "set_quantization", "set_timesteps", "shortcut_splits",
]

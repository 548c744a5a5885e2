"""qdistill: quantize diffusers models to 4 and 8 bits by block-wise knowledge distillation.

    from qdistill import QuantConfig, quantize_, fit_ranges_
    quantize_(unet, QuantConfig(weight_bits=4, act_bits=8))
    fit_ranges_(unet, batches)          # kwargs dicts of the UNet's own inputs along sampler trajectories
"""
from .quantizers import QuantConfig, find_blocks, fit_ranges_, quantize_, set_quantization, set_timesteps
from .version import __version__

__all__ = ["QuantConfig", "find_blocks", "fit_ranges_", "quantize_", "set_quantization", "set_timesteps", "__version__"]

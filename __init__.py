"""qdistill: quantize diffusers models to 4 and 8 bits by block-wise knowledge distillation.

    from qdistill import QuantConfig, quantize_, calibrate_
    quantize_(unet, QuantConfig(weight_bits=4, act_bits=8))
    calibrate_(unet, batches)          # kwargs dicts of the UNet's own inputs along sampler trajectories
"""
__version__ = "0.1.0"

from .quantizers import QuantConfig, calibrate_, find_blocks, quantize_, set_quantization, set_timesteps  # noqa: E402

__all__ = ["QuantConfig", "calibrate_", "find_blocks", "quantize_", "set_quantization", "set_timesteps", "__version__"]

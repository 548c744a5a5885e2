"""CLIP score of text-conditional samples with a local CLIP model folder (transformers CLIPModel +
CLIPProcessor, `save_pretrained` layout); torchmetrics' CLIPScore computes it."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError


class ProjectedFeatures(nn.Module):
    """A CLIPModel whose get_*_features return the projected embeddings as tensors: transformers 5 returns
    output objects (embedding in `pooler_output`) where torchmetrics 1.9 expects tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


@torch.no_grad()
def clip_score(images_u8: torch.Tensor, prompts: list[str], clip_dir: str | Path, batch_size: int = 64) -> float:
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    clip_dir = Path(clip_dir)
    if not (clip_dir / "config.json").is_file():
        raise ConfigError(f"config key 'clip': CLIP model folder not found or has no config.json: {clip_dir}")
    metric = CLIPScore(model_name_or_path=lambda: (ProjectedFeatures(CLIPModel.from_pretrained(clip_dir).eval()),
                                                   CLIPProcessor.from_pretrained(clip_dir)),
                       sync_on_compute=False)
    for i in range(0, len(prompts), batch_size):
        metric.update(list(images_u8[i:i + batch_size]), prompts[i:i + batch_size])
    return float(metric.compute())

"""Model helpers shared by unit and integration tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


def perturbed_model(model_dir: Path, seed: int, scale: float = 0.05) -> PreTrainedModel:
    """The model of `model_dir` with every weight moved by seeded noise: a 'trained' step."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model

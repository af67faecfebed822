"""The checkpoint schema of a model: every tensor name, shape and dtype an HF
checkpoint of it holds, derived from its config alone (a meta-device model, no
weights read). Engines validate update requests against it before touching anything.
"""
from __future__ import annotations

import torch

from rlloop.weights.protocol import ParameterInfo, dtype_name


def checkpoint_schema(model_path: str, dtype: torch.dtype) -> dict[str, ParameterInfo]:
    """Every tensor of the model's HF state dict by name, tied aliases included."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    dt = dtype_name(dtype)
    return {n: ParameterInfo(n, tuple(t.shape), dt) for n, t in model.state_dict().items()}

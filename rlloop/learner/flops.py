"""Model FLOPs of a learner step, and the peak they are measured against (MFU).

Model FLOPs count the work the model needs, not what the kernels happen to do: the
matmuls of every layer and the output head (2 FLOPs per weight per token forward) and
causal attention (QK^T and AV over the keys at or before each query: 2 s^2 d_attn per
layer forward, half the full square). Padding, recomputation and the embedding
lookup are not model FLOPs. A GRPO step runs each sample forward and backward once
(3x the forward) plus one forward per extra no-grad pass (the proximal anchor, the KL
reference), so the same formula serves every objective.
"""
from __future__ import annotations

from rlloop.learner.hf_megatron import Arch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from each vendor's datasheet;
# matched in order against torch.cuda.get_device_name(), so specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0), ("L4", 121.0),
)


def matmul_params(arch: Arch) -> int:
    """Weights that multiply each token once: every layer's projections and the head."""
    attn = arch.num_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    per_layer = arch.hidden_size * (attn + 2 * kv) + attn * arch.hidden_size + 3 * arch.hidden_size * arch.ffn_hidden_size
    return arch.num_layers * per_layer + arch.hidden_size * arch.vocab_size


def forward_flops(arch: Arch, lengths: list[int]) -> float:
    """Model FLOPs of one forward pass over sequences of these lengths."""
    n = matmul_params(arch)
    attn = arch.num_heads * arch.head_dim
    return float(sum(2 * n * s + 2 * arch.num_layers * s * s * attn for s in lengths))


def step_flops(arch: Arch, lengths: list[int], extra_forwards: int = 0) -> float:
    """A training step: forward + backward (3 forwards) and `extra_forwards` no-grad passes."""
    return (3 + extra_forwards) * forward_flops(arch, lengths)


def peak_flops(device_name: str, dtype: str, override_tflops: float | None = None) -> float | None:
    """The device's peak FLOP/s for `dtype`: the override when given, else the table's
    bf16/fp16 figure; None when unknown (CPUs, fp32 on GPUs): MFU is then not reported."""
    if override_tflops:
        return override_tflops * 1e12
    if dtype not in ("bfloat16", "float16"):
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None

"""Every shim megatron-core 0.16 needs to run on CPU, in one place.

megatron-core's modules run on CPU (gloo groups, `use_cpu_initialization=True`, an
explicit causal mask), except for a few hard-coded CUDA calls:

1. `torch.cuda.current_device()` is passed as `device=` when layers allocate
   buffers (tensor_parallel/layers.py, mappings.py, rotary embeddings). On CPU it
   returns "cpu", which every such call accepts.
2. The CUDA RNG tracker's `fork()` (entered around dropout and weight init in TP
   regions) switches CUDA generator states. Dropout is 0 in RL fine-tuning and the
   weights are loaded from a checkpoint, so on CPU `fork()` is a no-op context.

Megatron's DistributedDataParallel and optimizer allocate CUDA buffers throughout;
the learner uses them on GPU only and a torch optimizer on CPU (learner/megatron_learner.py).
On a machine with CUDA, `install()` changes only this, without Transformer Engine:

3. optimizer_config.py asks `is_te_min_version()` of every precision-aware optimizer
   (learner.optimizer_offload), which compares None with a version when TE is absent;
   with no TE, no minimum version is met.
"""
from __future__ import annotations

import contextlib

import torch

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from megatron.core.optimizer import optimizer_config
    from megatron.core.utils import get_te_version

    if get_te_version() is None:
        optimizer_config.is_te_min_version = lambda version, check_equality=True: False
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as megatron_random

    torch.cuda.current_device = lambda: "cpu"
    megatron_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()

"""The megatron-core learner: one Ray actor per rank, TP x DP ranks joined by
torch.distributed (gloo on CPU, nccl on GPU) and megatron's parallel_state.

Each rank builds a `GPTModel` (megatron's local layer spec with the core attention
that `learner.attention` picks, attention.py; Transformer Engine optional) from an HF
config, loads its TP shard from the HF safetensors directory, trains its DP share of
each batch, and takes part in exporting the weights:

  export  (megatron_weights.py) for each bucket of the HF update plan, the TP ranks gather the Megatron
          parameters that bucket needs onto TP rank 0 (global rank 0) in one
          collective; rank 0 converts them to HF tensors, packs them into the bucket
          and broadcasts it to every engine worker over the weight group. Beyond its
          shard, rank 0 holds about one bucket of gathered shards plus the two bucket
          buffers; no rank ever holds a full copy of the model. Engines of any TP
          size take the same full HF tensors and shard them as they load.

Log-probs are vocab-parallel: each TP rank keeps its slice of the logits and only
[tokens]-sized reductions cross ranks, never the full vocabulary. On CPU the
optimizer is torch AdamW with DP gradient averaging and TP-aware clipping; on GPU it
is megatron's (DistributedDataParallel + mixed-precision Adam with fp32 masters).
"""
from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from rlloop.learner import megatron_shims
from rlloop.learner.attention import layer_spec, needs_mask, resolve
from rlloop.learner.hf_megatron import Unit, arch_from_hf, check_tp, hf_shapes, to_megatron, units
from rlloop.learner.megatron_weights import MegatronWeights, SafetensorsDir
from rlloop.learner.policy import LearnerConfig, PolicyLearner, frozen_names, scatter
from rlloop.weights.protocol import DTYPES, ParameterInfo, UpdatePlan, dtype_name

MASKED_LOGIT = -1e30  # padded vocabulary columns: exp() is exactly 0
ENTROPY_ROWS = 4096  # scored positions per chunk of the (no-grad) entropy


def build_gpt(arch, tp_size: int, dtype: torch.dtype, device: torch.device, attention: str = "local",
              recompute: str = "none"):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = device.type == "cuda"
    if recompute != "none" and not on_gpu:  # megatron's checkpointing saves CUDA RNG states
        raise ValueError("learner.recompute needs a GPU; use recompute=none on CPU")
    recompute_args = {} if recompute == "none" else dict(
        recompute_granularity=recompute,
        **({"recompute_method": "uniform", "recompute_num_layers": 1} if recompute == "full" else {}))
    config = TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size, normalization="RMSNorm", layernorm_epsilon=arch.rms_eps,
        add_bias_linear=False, add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm,
        gated_linear_unit=True, activation_func=F.silu, hidden_dropout=0.0, attention_dropout=0.0,
        # SwiGLU's fusion is megatron's own (torch.jit) and needs a GPU; the others need
        # CUDA extensions (apex/TE) this learner does not require
        bias_activation_fusion=on_gpu, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True, tensor_model_parallel_size=tp_size,
        use_cpu_initialization=not on_gpu, perform_initialization=False,  # loaded next
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype, **recompute_args,
    )
    model = GPTModel(config, layer_spec(attention, arch.qk_norm),
                     vocab_size=arch.padded_vocab(tp_size), max_sequence_length=arch.max_positions,
                     position_embedding_type="rope", rotary_base=arch.rope_theta,
                     share_embeddings_and_output_weights=arch.tied, parallel_output=True)
    return model.to(device=device, dtype=dtype)  # the norms are created as fp32 CPU modules


class MegatronLearner(MegatronWeights, PolicyLearner):
    def __init__(self, cfg: LearnerConfig, rank: int, master_addr: str, master_port: int):
        from megatron.core import parallel_state
        from transformers import AutoConfig

        megatron_shims.install()
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.num_threads)
        self.cfg = cfg
        self.steps = 0
        on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        tp, dp = cfg.tensor_parallel_size, cfg.data_parallel_size
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://{master_addr}:{master_port}",
                                rank=rank, world_size=tp * dp, timeout=timedelta(minutes=10))
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        if on_gpu:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(cfg.seed)
        self.rank = rank
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.tp_rank, self.tp_size = parallel_state.get_tensor_model_parallel_rank(), tp
        self.dp_rank, self.dp_size = parallel_state.get_data_parallel_rank(), dp
        self.arch = arch_from_hf(AutoConfig.from_pretrained(cfg.model))
        check_tp(self.arch, tp)
        self.units = units(self.arch)
        self.dtype = DTYPES[cfg.dtype]
        self.attention = resolve(cfg.attention, on_gpu)
        self.world_size = tp * dp
        self._set_peak()
        self.model = self._load(cfg.model)
        self.ref = self._load(cfg.model).eval() if cfg.objective.kl_coef > 0 else None
        self.params = dict(self.model.named_parameters())
        self.frozen_units = self._freeze(cfg.freeze)
        # Columns of this rank's logit slice past the real vocabulary (padding).
        per_rank = self.arch.padded_vocab(tp) // tp
        first = self.tp_rank * per_rank
        self.vocab_mask = torch.where(torch.arange(first, first + per_rank) < self.arch.vocab_size,
                                      0.0, MASKED_LOGIT).to(self.device)
        self._causal: dict[int, torch.Tensor] = {}
        self.ddp = None
        if cfg.optimizer_offload and not on_gpu:
            raise ValueError("learner.optimizer_offload needs a GPU (the CPU learner's optimizer is on the CPU)")
        if on_gpu:
            self._megatron_optimizer()
        else:
            self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                         weight_decay=cfg.weight_decay)
        self.sender = None
        self._senders = self._replicas = 1  # of the weight group joined (join_weight_group)
        # What the engines receive: HF names and shapes, from shard shapes alone.
        self.hf_params = tuple(
            ParameterInfo(name, shape, dtype_name(self.dtype)) for u in self.units
            if u.megatron not in self.frozen_units
            for name, shape in hf_shapes(u, self.arch, self.params[u.megatron], tp).items())
        self._plan: UpdatePlan | None = None
        self._order: dict[str, list[list[Unit]]] = {}

    # --- model ------------------------------------------------------------------------

    def _freeze(self, patterns: tuple[str, ...]) -> set[str]:
        """Stop training the megatron parameters whose HF tensors `patterns` match; returns
        their names. One megatron parameter that holds several HF tensors (q/k/v in
        linear_qkv, gate/up in linear_fc1, tied embeddings) is frozen whole or not at all."""
        frozen = frozen_names([n for u in self.units for n in u.hf], patterns)
        units_frozen = set()
        for u in self.units:
            hit = frozen.intersection(u.hf)
            if hit and len(hit) < len(u.hf):
                raise ValueError(f"learner.freeze: {list(u.hf)} are one megatron parameter ({u.megatron}): "
                                 "freeze all of them or none")
            if hit:
                self.params[u.megatron].requires_grad_(False)
                units_frozen.add(u.megatron)
        return units_frozen

    def _load(self, path: str):
        model = build_gpt(self.arch, self.tp_size, self.dtype, self.device, self.attention, self.cfg.recompute)
        self._copy_in(model, SafetensorsDir(path))
        return model

    def _copy_in(self, model, hf: Mapping[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        expected = {u.megatron for u in self.units}
        if set(params) != expected:
            raise RuntimeError(f"megatron model and conversion disagree: "
                               f"{sorted(set(params) ^ expected)[:5]}")
        with torch.no_grad():
            for u in self.units:
                params[u.megatron].copy_(to_megatron(u, self.arch, hf, self.tp_rank, self.tp_size))

    def _megatron_optimizer(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        cfg = self.cfg
        offload = cfg.optimizer_offload > 0
        self.ddp = DistributedDataParallel(
            self.model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=cfg.fp32_grads,
                                                             use_distributed_optimizer=offload), self.model)
        # megatron offloads only through its distributed (precision-aware) optimizer: the
        # offloaded share's fp32 masters and Adam moments live and step on the CPU
        offload_args = dict(use_distributed_optimizer=True, use_precision_aware_optimizer=True,
                            optimizer_cpu_offload=True, optimizer_offload_fraction=cfg.optimizer_offload,
                            overlap_cpu_optimizer_d2h_h2d=True) if offload else {}
        self.opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay,
                            bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
                            clip_grad=cfg.max_grad_norm, **offload_args),
            [self.ddp])
        if type(self.opt.optimizer) is torch.optim.AdamW:
            # megatron's fallback without apex/TE. torch's default (foreach) kernels allocate
            # temporaries as large as all parameters (a 7B model: 30 GB); the fused kernel
            # updates in place and is one launch
            for group in self.opt.optimizer.param_groups:
                group.update(foreach=False, fused=True)

    def logits(self, ids: torch.Tensor, at: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """This TP rank's slice of the logits at the positions `at` [N, T-1] marks (those
        whose next token is scored): [K, padded_vocab / tp] for K = at.sum(), in
        row-major order. Only those hidden states reach the output layer, so prompt and
        padding positions cost no vocabulary-sized work."""
        module = self.ref if reference else self.model
        n, t = ids.shape
        mask = None
        if needs_mask(self.attention):
            mask = self._causal.get(t)
            if mask is None:  # megatron takes True = masked
                mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=self.device), 1)[None, None]
                self._causal = {t: mask}
        rows = torch.nn.functional.pad(at, (0, 1))  # the last position predicts nothing

        def scored_only(_, args):  # the output layer's input is [T, N, hidden]
            return (args[0].transpose(0, 1)[rows].unsqueeze(1), *args[1:])

        hook = module.output_layer.register_forward_pre_hook(scored_only)
        try:
            pos = torch.arange(t, device=self.device).expand(n, t)
            out = (module if reference else self.ddp or module)(ids, pos, mask)
        finally:
            hook.remove()
        return out[0]  # [1, K, V/tp] -> [K, V/tp]

    def token_logprobs(self, ids: torch.Tensor, at: torch.Tensor, reference: bool = False):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        z = self.logits(ids, at, reference).float() + self.vocab_mask
        with torch.no_grad():  # entropy = log Z - E_p[z], from token-sized reductions
            m = z.max(dim=-1).values
            dist.all_reduce(m, dist.ReduceOp.MAX, group=self.tp_group)
            sums = torch.empty(2, len(z), device=z.device)
            for i in range(0, len(z), ENTROPY_ROWS):  # bounded temporaries: [rows, V/tp]
                zm = z[i:i + ENTROPY_ROWS] - m[i:i + ENTROPY_ROWS, None]
                e = zm.exp()
                sums[0, i:i + ENTROPY_ROWS] = e.sum(-1)
                sums[1, i:i + ENTROPY_ROWS] = torch.einsum("kv,kv->k", e, zm)
                del zm, e
            dist.all_reduce(sums, group=self.tp_group)
            entropy = sums[0].log() - sums[1] / sums[0]
        # after the entropy: megatron's cross entropy works on its input in place
        tok = -vocab_parallel_cross_entropy(z, ids[:, 1:][at])
        return scatter(at, tok), scatter(at, entropy)

    def my_share(self, items: list) -> list:
        return items[self.dp_rank::self.dp_size]

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._dp_reduce(t, dist.ReduceOp.SUM)

    def dp_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._dp_reduce(t, dist.ReduceOp.MAX)

    def _dp_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.dp_size == 1:
            return t
        t = t.to(self.device)  # nccl reduces on the GPU
        dist.all_reduce(t, op, group=self.dp_group)
        return t.cpu()

    # --- optimizer --------------------------------------------------------------------

    def zero_grad(self) -> None:
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
            self.opt.zero_grad()
        else:
            self.opt.zero_grad(set_to_none=True)

    def step(self, lr: float) -> float:
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.ddp is not None:  # megatron: DP all-reduce of main_grad, clip, fp32-master Adam
            self.ddp.finish_grad_sync()
            _, grad_norm, _ = self.opt.step()
            return float(grad_norm)
        if self.dp_size > 1:  # every rank reduces the same tensors, used or not
            for p in self.model.parameters():
                if p.grad is None and p.requires_grad:  # a frozen one gets none: AdamW would decay it
                    p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.dp_size > 1:
            flat = _flatten_dense_tensors(grads) / self.dp_size  # one all-reduce for all
            dist.all_reduce(flat, group=self.dp_group)
            torch._foreach_copy_(grads, list(_unflatten_dense_tensors(flat, grads)))
        norm = self._grad_norm()
        if norm > self.cfg.max_grad_norm:
            torch._foreach_mul_(grads, self.cfg.max_grad_norm / (norm + 1e-6))
        self.opt.step()
        return norm

    def _grad_norm(self) -> float:
        """The norm of the whole model's gradient: TP-sharded parameters summed over TP
        ranks, replicated ones (identical on every rank) counted once."""
        sharded, replicated = torch.zeros(()), torch.zeros(())
        for u in self.units:  # (megatron marks TP parameters only when it initialises them)
            grad = self.params[u.megatron].grad
            if grad is not None:
                sq = grad.float().pow(2).sum().cpu()
                if u.kind == "replicated":
                    replicated += sq
                else:
                    sharded += sq
        dist.all_reduce(sharded, group=self.tp_group)
        return (sharded + replicated).sqrt().item()

"""The direct layout: checkpoint tensors -> slices of vLLM's fused, TP-sharded
parameters. vLLM on CPU repacks its weights, so the direct path only runs on GPU;
here its slicing is checked against shards built by hand the way vLLM shards."""
import pytest
import torch

from rlloop.weights.layout import LayoutMismatch, as_full, bucket_view, build_direct_copies
from rlloop.weights.protocol import WeightUpdateError, make_plan, parameter_infos, tp_dim

H, HEADS, KV, D, I, V, VPAD = 64, 4, 2, 16, 96, 50, 64
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def hf_tensors():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": r(V, H),
        p + "self_attn.q_proj.weight": r(HEADS * D, H), p + "self_attn.q_proj.bias": r(HEADS * D),
        p + "self_attn.k_proj.weight": r(KV * D, H), p + "self_attn.k_proj.bias": r(KV * D),
        p + "self_attn.v_proj.weight": r(KV * D, H), p + "self_attn.v_proj.bias": r(KV * D),
        p + "self_attn.o_proj.weight": r(H, HEADS * D),
        p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H),
        p + "mlp.down_proj.weight": r(H, I),
        p + "input_layernorm.weight": r(H),
        "model.norm.weight": r(H),
    }


def vllm_shards(hf, rank, tp):
    """What vLLM holds on TP rank `rank` (written independently of layout.py)."""
    p = "model.layers.0."
    rows = lambda t, n: t.chunk(tp)[rank] if n >= tp else t.chunk(n)[rank // (tp // n)]  # noqa: E731
    out = {}
    emb = torch.zeros(VPAD // tp, H)
    part = hf["model.embed_tokens.weight"][rank * VPAD // tp:(rank + 1) * VPAD // tp]
    emb[:len(part)] = part
    out["model.embed_tokens.weight"] = emb
    for leaf in ("weight", "bias"):
        out[p + f"self_attn.qkv_proj.{leaf}"] = torch.cat([
            rows(hf[p + f"self_attn.q_proj.{leaf}"], HEADS),
            rows(hf[p + f"self_attn.k_proj.{leaf}"], KV),
            rows(hf[p + f"self_attn.v_proj.{leaf}"], KV)])
    out[p + "self_attn.o_proj.weight"] = hf[p + "self_attn.o_proj.weight"].chunk(tp, dim=1)[rank]
    out[p + "mlp.gate_up_proj.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"].chunk(tp)[rank],
                                                    hf[p + "mlp.up_proj.weight"].chunk(tp)[rank]])
    out[p + "mlp.down_proj.weight"] = hf[p + "mlp.down_proj.weight"].chunk(tp, dim=1)[rank]
    out[p + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
    out["model.norm.weight"] = hf["model.norm.weight"]
    return out


def _shard(name: str, t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    dim = tp_dim(name)
    return t if dim is None else t.chunk(tp, dim=dim)[rank]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("sharded", [False, True], ids=["full", "sharded"])
def test_direct_copies_rebuild_every_tp_shard(tp, sharded):
    """From full checkpoint tensors, or (sharded) from each rank's own shards as a
    learner TP rank sends them: every vLLM shard is rebuilt exactly."""
    hf = hf_tensors()
    if sharded and tp > KV:  # a rank would hold part of a KV head
        with pytest.raises(WeightUpdateError, match="whole KV heads"):
            build_direct_copies(make_plan(parameter_infos(hf.items())), {}, PACKED, KV, 0, tp, sharded=True)
        return
    for rank in range(tp):
        sent = {n: _shard(n, t, rank, tp) for n, t in hf.items()} if sharded else hf
        plan = make_plan(parameter_infos(sent.items()), bucket_bytes=20_000)
        buffers = [torch.zeros(b.nbytes, dtype=torch.uint8) for b in plan.buckets]
        for i, b in enumerate(plan.buckets):
            for e in b.entries:
                bucket_view(buffers[i], plan, e.param, e.offset).copy_(sent[plan.params[e.param].name])
        want = vllm_shards(hf, rank, tp)
        params = {n: torch.full_like(t, float("nan")) for n, t in want.items()}
        params["model.embed_tokens.weight"].zero_()  # padding rows are never written
        per_bucket = build_direct_copies(plan, params, PACKED, KV, rank, tp, sharded=sharded and tp > 1)
        for i, copies in enumerate(per_bucket):
            offsets = {e.param: e.offset for e in plan.buckets[i].entries}
            for c in copies:
                c.dst.copy_(bucket_view(buffers[i], plan, c.param, offsets[c.param]).narrow(c.dim, c.start, c.length))
        for name, t in want.items():
            assert torch.equal(params[name], t), (tp, rank, name)


def test_a_shard_reaches_vllms_loader_where_its_rank_reads_it():
    """vLLM's checkpoint loader cuts rank r's equal chunk out of a full tensor: as_full
    puts a sharded update's tensor there."""
    hf = hf_tensors()
    for name, t in hf.items():
        dim = tp_dim(name)
        for rank in range(2):
            full = as_full(name, _shard(name, t, rank, 2), rank, 2)
            assert full.shape == t.shape
            assert torch.equal(_shard(name, full, rank, 2), _shard(name, t, rank, 2)), name
            if dim is None:  # whole on every rank
                assert torch.equal(full, t), name


def test_unknown_or_repacked_parameters_fall_back():
    hf = hf_tensors()
    plan = make_plan(parameter_infos(hf.items()))
    params = vllm_shards(hf, 0, 1)
    with pytest.raises(LayoutMismatch, match="no checkpoint tensor"):
        build_direct_copies(plan, {**params, "model.extra.weight": torch.zeros(3)}, PACKED, KV, 0, 1)
    repacked = dict(params)
    repacked["model.layers.0.mlp.down_proj.weight"] = torch.empty(0)  # as vLLM CPU shows it
    with pytest.raises(LayoutMismatch):
        build_direct_copies(plan, repacked, PACKED, KV, 0, 1)

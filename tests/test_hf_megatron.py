"""HF <-> Megatron conversion as pure tensor code: every family's round trip is
bit-exact at TP=1, 2 and 4, and shards have the shapes megatron's layers take."""
import pytest
import torch

from rlloop.learner.hf_megatron import (UnsupportedModel, arch_from_hf, check_tp, hf_shapes, to_hf,
                                        to_hf_shard, to_megatron, units)
from rlloop.weights.protocol import shard_shape, tp_dim


def _config(family: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    if family == "qwen2":  # QKV bias, tied
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":  # QK-norm, head_dim != hidden/heads, untied
        return Qwen3Config(**common, head_dim=16, tie_word_embeddings=False)
    return LlamaConfig(**common, tie_word_embeddings=False)  # no biases, untied


def _hf_state(config) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # norms too: a swapped or misplaced tensor must show
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_is_bit_exact(family, tp):
    config = _config(family)
    arch = arch_from_hf(config)
    hf = _hf_state(config)
    covered = set()
    for u in units(arch):
        shards = [to_megatron(u, arch, hf, r, tp) for r in range(tp)]
        assert len({s.shape for s in shards}) == 1
        back = to_hf(u, arch, shards)
        assert hf_shapes(u, arch, shards[0], tp) == {n: tuple(t.shape) for n, t in back.items()}
        for name, t in back.items():
            assert torch.equal(t, hf[name]), name
        covered |= set(back)
    assert covered == set(hf)  # every tensor of the HF state dict, tied alias included


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("tp", [2, 4])
def test_a_rank_converts_its_own_shard_to_the_slices_vllm_holds(family, tp):
    """What a TP rank sends in a sharded update is, for every tensor TP splits, the
    rank's equal chunk of the HF tensor along that dimension (how vLLM shards it), and
    every other tensor whole; no other rank's shard is needed."""
    config = _config(family)
    arch = arch_from_hf(config)
    hf = _hf_state(config)
    for u in units(arch):
        if u.kind == "vocab":
            continue  # travels whole (gathered)
        for r in range(tp):
            mine = to_hf_shard(u, arch, to_megatron(u, arch, hf, r, tp), tp)
            for name, t in mine.items():
                dim = tp_dim(name)
                want = hf[name] if dim is None else hf[name].chunk(tp, dim=dim)[r]
                assert torch.equal(t, want), (name, r)
                assert tuple(t.shape) == shard_shape(name, tuple(hf[name].shape), tp)


def test_fused_layouts_follow_megatron():
    """QKV interleaves per query group, fc1 is [gate; up] per rank, vocab is padded."""
    arch = arch_from_hf(_config("qwen2"))  # 8 heads, 4 groups: 2 q heads per group
    hf = _hf_state(_config("qwen2"))
    unit = {u.megatron: u for u in units(arch)}
    qkv = to_megatron(unit["decoder.layers.1.self_attention.linear_qkv.weight"], arch, hf, 1, 2)  # groups 2, 3
    d = arch.head_dim
    q, k = hf["model.layers.1.self_attn.q_proj.weight"], hf["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(qkv[:2 * d], q[4 * d:6 * d])  # group 2's q heads (4, 5), then its k
    assert torch.equal(qkv[2 * d:3 * d], k[2 * d:3 * d])
    fc1 = to_megatron(unit["decoder.layers.1.mlp.linear_fc1.weight"], arch, hf, 0, 2)
    gate = hf["model.layers.1.mlp.gate_proj.weight"]
    assert torch.equal(fc1[:48], gate[:48])
    assert arch.padded_vocab(2) == 256  # 128 rows per rank
    emb = [to_megatron(unit["embedding.word_embeddings.weight"], arch, hf, r, 2) for r in range(2)]
    assert torch.equal(emb[0][:100], hf["model.embed_tokens.weight"])
    assert not emb[0][100:].any() and not emb[1].any()


def test_unsupported_models_are_refused_clearly():
    config = _config("llama")
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(UnsupportedModel, match="rope scaling 'llama3'"):
        arch_from_hf(config)
    with pytest.raises(UnsupportedModel, match="num_key_value_heads=4 is not divisible by tensor_parallel_size=8"):
        check_tp(arch_from_hf(_config("qwen2")), 8)

"""Pure logic of the update protocol: bucket packing, validation, tickets."""
import pickle

import pytest

from rlloop.weights.protocol import (ALIGN_BYTES, ParameterInfo, UpdatePlan, WeightUpdateError,
                                     WeightUpdateRequest, load_groups, make_plan, resolve, shard_shape, tp_dim,
                                     validate_request)


def _params():
    return [ParameterInfo(f"w{i}", (i + 1, 7), "float32") for i in range(10)] + \
           [ParameterInfo("big", (1000, 100), "bfloat16")]


def test_buckets_hold_every_param_once_aligned_and_within_budget():
    plan = make_plan(_params(), bucket_bytes=300)
    seen = sorted(e.param for b in plan.buckets for e in b.entries)
    assert seen == list(range(len(plan.params)))
    for b in plan.buckets:
        ends = []
        for e in b.entries:
            p = plan.params[e.param]
            assert e.offset % ALIGN_BYTES == 0
            ends.append((e.offset, e.offset + p.nbytes))
        assert all(a[1] <= b2[0] for a, b2 in zip(ends, ends[1:])), "entries overlap"
        assert b.nbytes >= ends[-1][1]
        assert len(b.entries) == 1 or b.nbytes <= 300 + ALIGN_BYTES
    # The oversized tensor travels alone.
    big = [b for b in plan.buckets if any(plan.params[e.param].name == "big" for e in b.entries)]
    assert len(big) == 1 and len(big[0].entries) == 1


def test_plan_key_is_stable_and_content_addressed():
    assert make_plan(_params()).key == make_plan(_params()).key
    assert make_plan(_params()).key != make_plan(_params()[:-1]).key
    assert make_plan(_params(), 300).key != make_plan(_params(), 600).key


def test_plan_rejects_duplicates_and_unknown_dtypes():
    with pytest.raises(WeightUpdateError, match="duplicate"):
        make_plan(_params() + _params()[:1])
    with pytest.raises(WeightUpdateError, match="dtype"):
        make_plan([ParameterInfo("x", (2,), "int8")])


def test_validation_names_every_kind_of_problem():
    schema = {p.name: p for p in _params()}
    good = make_plan(_params())
    validate_request(WeightUpdateRequest(3, good), schema, current_version=2)
    with pytest.raises(WeightUpdateError, match="stale"):
        validate_request(WeightUpdateRequest(2, good), schema, current_version=2)
    with pytest.raises(WeightUpdateError, match="tp_size"):
        validate_request(WeightUpdateRequest(3, good, tp_rank=1, tp_size=2), schema, current_version=2)
    with pytest.raises(WeightUpdateError, match="tp_size"):
        validate_request(WeightUpdateRequest(3, good, tp_rank=2, tp_size=2), schema, current_version=2, tp_size=2)
    bad = _params()
    bad[0] = ParameterInfo("w0", (9, 9), "float32")
    bad[1] = ParameterInfo("w1", (2, 7), "float16")
    bad.append(ParameterInfo("nope", (1,), "float32"))
    with pytest.raises(WeightUpdateError) as e:
        validate_request(WeightUpdateRequest(3, make_plan(bad[:-2] + bad[-1:])), schema, current_version=0)
    msg = str(e.value)
    assert "w0: shape" in msg and "w1: dtype" in msg and "unknown parameter 'nope'" in msg
    assert "missing 1 parameter" in msg


def test_a_sharded_request_carries_each_rank_s_shards_of_what_tp_splits():
    """TP=2 shards: q/k/v/gate/up halve their rows, o/down their columns; norms, biases
    of row-parallel layers and the vocabulary stay whole. Full shapes, shards of another
    TP size or shapes that do not split are refused by name."""
    full = {"model.embed_tokens.weight": (10, 8), "model.norm.weight": (8,),
            "model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.q_proj.bias": (8,),
            "model.layers.0.self_attn.o_proj.weight": (8, 8), "model.layers.0.mlp.down_proj.weight": (8, 6),
            "model.layers.0.mlp.gate_proj.weight": (6, 8)}
    schema = {n: ParameterInfo(n, s, "float32") for n, s in full.items()}
    assert [shard_shape(n, s, 2) for n, s in full.items()] == [(10, 8), (8,), (4, 8), (4,), (8, 4), (8, 3), (3, 8)]
    assert tp_dim("model.layers.0.self_attn.o_proj.bias") is None
    shards = make_plan([ParameterInfo(n, shard_shape(n, s, 2), "float32") for n, s in full.items()])
    for rank in range(2):
        validate_request(WeightUpdateRequest(1, shards, rank, 2), schema, current_version=0, tp_size=2)
    with pytest.raises(WeightUpdateError, match="TP size, 2"):
        validate_request(WeightUpdateRequest(1, shards, 0, 4), schema, current_version=0, tp_size=2)
    with pytest.raises(WeightUpdateError, match=r"q_proj.weight: shape \(8, 8\) != model's TP-2 shard \(4, 8\)"):
        validate_request(WeightUpdateRequest(1, make_plan(list(schema.values())), 0, 2), schema, 0, tp_size=2)
    with pytest.raises(WeightUpdateError, match="does not split over 4"):
        validate_request(WeightUpdateRequest(1, shards, 0, 4), schema, current_version=0, tp_size=4)


def _layer_schema():
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for i in range(2):
        a = f"model.layers.{i}."
        names += [a + "input_layernorm.weight", a + "mlp.down_proj.weight", a + "mlp.gate_proj.weight",
                  a + "mlp.up_proj.weight", a + "self_attn.o_proj.weight"]
        names += [a + f"self_attn.{p}_proj.{leaf}" for p in "qkv" for leaf in ("weight", "bias")]
    return {n: ParameterInfo(n, (4, 4), "float32") for n in names}


PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_load_groups_join_fused_shards_with_their_biases_and_tied_embeddings():
    schema = _layer_schema()
    groups = load_groups(schema, PACKED, tied=True)
    assert groups["model.layers.0.self_attn.q_proj.weight"] == {
        f"model.layers.0.self_attn.{p}_proj.{leaf}" for p in "qkv" for leaf in ("weight", "bias")}
    assert groups["model.layers.1.mlp.up_proj.weight"] == {"model.layers.1.mlp.gate_proj.weight",
                                                           "model.layers.1.mlp.up_proj.weight"}
    assert groups["model.layers.0.mlp.down_proj.weight"] == {"model.layers.0.mlp.down_proj.weight"}
    assert groups["lm_head.weight"] == {"lm_head.weight", "model.embed_tokens.weight"}
    assert load_groups(schema, PACKED, tied=False)["lm_head.weight"] == {"lm_head.weight"}


def test_a_partial_plan_may_leave_out_whole_groups_only():
    schema = _layer_schema()
    groups = load_groups(schema, PACKED, tied=True)
    layer0 = [p for n, p in schema.items() if n.startswith("model.layers.0.")]
    validate_request(WeightUpdateRequest(1, make_plan(layer0, partial=True)), schema, 0, groups)
    with pytest.raises(WeightUpdateError, match="missing"):  # the same subset as a full plan
        validate_request(WeightUpdateRequest(1, make_plan(layer0)), schema, 0, groups)
    split = [p for p in layer0 if "k_proj" not in p.name]
    with pytest.raises(WeightUpdateError, match="splits what loads together") as e:
        validate_request(WeightUpdateRequest(1, make_plan(split, partial=True)), schema, 0, groups)
    assert "model.layers.0.self_attn.k_proj.bias" in str(e.value)
    with pytest.raises(WeightUpdateError, match="splits"):  # a tied head without its embedding
        validate_request(WeightUpdateRequest(1, make_plan([schema["lm_head.weight"]], partial=True)),
                         schema, 0, groups)
    with pytest.raises(WeightUpdateError, match="unknown parameter"):
        validate_request(WeightUpdateRequest(1, make_plan(layer0 + [ParameterInfo("model.extra", (1,), "float32")],
                                                          partial=True)), schema, 0, groups)
    # A hand-built plan that names a tensor twice never reaches a model.
    plan = make_plan(layer0, partial=True)
    twice = UpdatePlan(plan.params + plan.params[:1], plan.buckets, plan.key, partial=True)
    with pytest.raises(WeightUpdateError, match="sent twice"):
        validate_request(WeightUpdateRequest(1, twice), schema, 0, groups)
    assert make_plan(layer0, partial=True).key != make_plan(layer0).key


def test_a_ticket_stands_for_its_request_where_the_plan_is_held():
    plan = make_plan(_params())
    request = WeightUpdateRequest(4, plan, tp_rank=0, tp_size=1)
    ticket = request.ticket()
    assert ticket.plan_key == plan.key and ticket.version == 4
    assert resolve(ticket, {plan.key: plan}) == request
    assert resolve(request, {}) is request  # a request in full carries its plan
    with pytest.raises(WeightUpdateError, match="has not been given"):
        resolve(ticket, {})
    # What crosses each hop per update: a model-sized plan (300 tensors) vs its ticket.
    big = WeightUpdateRequest(5, make_plan([ParameterInfo(f"model.layers.{i}.w", (64, 64), "bfloat16")
                                            for i in range(300)]))
    assert len(pickle.dumps(big.ticket())) < len(pickle.dumps(big)) / 100

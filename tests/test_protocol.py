"""Pure logic of the update protocol: bucket packing, validation, tickets."""
import pickle

import pytest

from rlloop.weights.protocol import (ALIGN_BYTES, ParameterInfo, WeightUpdateError,
                                     WeightUpdateRequest, make_plan, resolve, validate_request)


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
    bad = _params()
    bad[0] = ParameterInfo("w0", (9, 9), "float32")
    bad[1] = ParameterInfo("w1", (2, 7), "float16")
    bad.append(ParameterInfo("nope", (1,), "float32"))
    with pytest.raises(WeightUpdateError) as e:
        validate_request(WeightUpdateRequest(3, make_plan(bad[:-2] + bad[-1:])), schema, current_version=0)
    msg = str(e.value)
    assert "w0: shape" in msg and "w1: dtype" in msg and "unknown parameter 'nope'" in msg
    assert "missing 1 parameter" in msg


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

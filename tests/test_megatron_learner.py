"""The megatron-core learner on real components: one Ray actor per rank, ranks joined
by gloo and megatron's parallel_state, a real vLLM (CPU) engine, transformers as
ground truth."""
from __future__ import annotations

import sys
import time

import pytest
import ray
import torch
from safetensors.torch import load_file

from rlloop.actors.engine import EngineConfig, Sampling, engine_actor
from rlloop.actors.learner_group import LearnerGroup
from rlloop.actors.weight_sync import UpdatePusher, join_engines, weight_group_config
from rlloop.learner.policy import LearnerConfig
from rlloop.models.tiny import build_tiny_model
from rlloop.weights.protocol import WeightUpdateRequest

pytestmark = pytest.mark.integration

LOGPROB_ATOL = 1e-4  # fp32 learner vs fp32 transformers, every token of whole sequences
# fp32 learner vs the engine's own log-probs of the tokens it sampled: different
# kernels (vLLM CPU attention, megatron's unfused attention) on the same weights.
ENGINE_LOGPROB_ATOL = 1e-3


def _learner(model: str, name: str, tp: int = 1, dp: int = 1, backend: str = "megatron", **kw) -> LearnerGroup:
    cfg = LearnerConfig(model=model, backend=backend, tensor_parallel_size=tp, data_parallel_size=dp, **kw)
    group = LearnerGroup(cfg, name)
    group.wait_ready(deadline=time.time() + 300)
    return group


def _hf_logprobs(model: str, ids: list[list[int]]) -> torch.Tensor:
    """transformers' log-prob of each token after the first."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor(ids)).logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, torch.tensor(ids)[:, 1:, None])[..., 0]


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("qwen3") / "model", seed=3, family="qwen3"))


@pytest.mark.parametrize("family,tp", [("qwen2", 1), ("qwen2", 2), ("qwen3", 2)])
def test_learner_round_trips_and_computes_like_transformers(family, tp, tiny_model, qwen3_model,
                                                            ray_cluster, tmp_path):
    """HF -> megatron ranks -> HF is bit-exact (at TP=2 saved in several shards with
    an index, as HF writes large models), and the learner's logits equal transformers'
    on the same weights."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    model = tiny_model if family == "qwen2" else qwen3_model
    learner = _learner(model, f"mcore-{family}-tp{tp}", tp=tp)
    try:
        learner.save(str(tmp_path / "saved"), 256 << 10 if tp == 2 else 2 << 30)
        files = sorted((tmp_path / "saved").glob("*.safetensors"))
        assert (len(files) == 1) == (tp == 1), files  # 1.3 MB in 256 KiB shards at TP=2
        assert (tmp_path / "saved/model.safetensors.index.json").is_file() == (tp == 2)
        original, saved = load_file(f"{model}/model.safetensors"), {}
        for f in files:
            saved.update(load_file(f))
        assert saved.keys() == original.keys()
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
        assert all(torch.equal(reloaded[k], v) for k, v in original.items())
        assert Path(tmp_path / "saved/tokenizer.json").is_file()
        for name, t in original.items():
            assert torch.equal(saved[name], t), name
        ids = [[3, 14, 15, 9, 26, 5, 35, 8, 9, 7], [12, 13, 4, 4, 19, 20, 21, 22, 40, 2]]
        ours = torch.tensor(learner.score([i[:1] for i in ids], [i[1:] for i in ids]))
        diff = (ours - _hf_logprobs(model, ids)).abs().max().item()
        print(f"{family} TP={tp}: max |log-prob diff| vs transformers {diff:.2e}")
        assert diff <= LOGPROB_ATOL
    finally:
        learner.kill()


@pytest.fixture(scope="module")
def trained_tp2(tiny_model, ray_cluster):
    """A TP=2 learner and the loss curves of HF, TP=2 and DP=2 learners trained on the
    same fixed batch."""
    prompts = [[3 + i, 10 + i, 20] for i in range(8)]
    targets = [[30 + i, 40 + (i * 3) % 7, 0] for i in range(8)]  # equal lengths: DP means agree
    common = dict(sft_lr=3e-3, max_grad_norm=0.5)  # a small clip norm: clipping is exercised
    curves = {}
    learners = {"hf": _learner(tiny_model, "mcore-train-hf", backend="hf", **common),
                "dp2": _learner(tiny_model, "mcore-train-dp2", dp=2, micro_batch_size=3, **common),
                "tp2": _learner(tiny_model, "mcore-train-tp2", tp=2, **common)}
    for key, learner in learners.items():
        curves[key] = [learner.sft_step(prompts, targets)["sft_loss"] for _ in range(6)]
    learners["hf"].kill()
    learners["dp2"].kill()
    yield learners["tp2"], curves
    learners["tp2"].kill()


def test_tp_and_dp_learners_train_exactly_like_one_process(trained_tp2):
    """A few optimizer steps lower the loss on a fixed batch; TP=2 and DP=2 (in
    micro-batches of 3 + 1) follow the single-process transformers learner step for
    step: gradient averaging, accumulation and the TP-aware clipping norm are right."""
    _, curves = trained_tp2
    print({k: [round(x, 5) for x in v] for k, v in curves.items()})
    assert curves["tp2"][-1] < curves["tp2"][0] - 0.5
    for key in ("tp2", "dp2"):
        assert max(abs(a - b) for a, b in zip(curves[key], curves["hf"])) < 1e-4, key


def _checkpoint(path) -> dict[str, torch.Tensor]:
    import glob

    out = {}
    for f in sorted(glob.glob(f"{path}/*.safetensors")):
        out.update(load_file(f))
    return out


def test_frozen_tensors_stay_fixed_and_out_of_the_update_plan(tiny_model, ray_cluster, tmp_path):
    """learner.freeze: the tensors it matches keep their values through training and
    are not in the (partial) update plan; the HF learner and a TP=2 megatron learner
    train the rest step for step alike. A pattern that matches nothing, or splits one
    megatron parameter (q_proj without k and v, in linear_qkv), is refused at start."""
    frozen = {"model.embed_tokens.weight", "lm_head.weight"}  # tied in the tiny qwen2: both or neither
    freeze = (*sorted(frozen), "model.layers.0.*")
    prompts = [[3 + i, 10 + i, 20] for i in range(8)]
    targets = [[30 + i, 40 + (i * 3) % 7, 0] for i in range(8)]
    common = dict(sft_lr=3e-3, max_grad_norm=0.5, freeze=freeze)
    learners = {"hf": _learner(tiny_model, "freeze-hf", backend="hf", **common),
                "tp2": _learner(tiny_model, "freeze-tp2", tp=2, **common)}
    curves = {k: [g.sft_step(prompts, targets)["sft_loss"] for _ in range(4)] for k, g in learners.items()}
    assert curves["tp2"][-1] < curves["tp2"][0] - 0.2
    assert max(abs(a - b) for a, b in zip(curves["tp2"], curves["hf"])) < 1e-4, curves
    before = _checkpoint(tiny_model)
    frozen |= {n for n in before if n.startswith("model.layers.0.")}
    for key, group in learners.items():
        plan = group.weight_plan(1 << 20)
        assert plan.partial and {p.name for p in plan.params} == set(before) - frozen - {"lm_head.weight"}
        group.save(str(tmp_path / key))
        after = _checkpoint(tmp_path / key)
        for name in set(before) & set(after):
            assert torch.equal(after[name], before[name]) == (name in frozen), (key, name)
        group.kill()
    with pytest.raises(Exception, match="one megatron parameter"):
        _learner(tiny_model, "freeze-split", freeze=("model.layers.0.self_attn.q_proj.weight",))
    with pytest.raises(Exception, match="matches no tensor"):
        _learner(tiny_model, "freeze-typo", backend="hf", freeze=("model.layer.0.*",))


def test_tp2_export_reaches_an_engine_and_agrees_with_it(trained_tp2, tiny_model, tmp_path, greedy,
                                                         probe_prompts):
    """Weights exported from a TP=2 learner (gathered per bucket, sent by rank 0) make
    the engine decode exactly as transformers does with those weights, and the
    learner's log-probs of the engine's sampled tokens match the engine's."""
    learner, _ = trained_tp2
    engine = engine_actor(EngineConfig(model=tiny_model, gpu_memory_utilization=0.05, max_model_len=512),
                          name="mcore-export/engine/0")
    try:
        ray.get(engine.ready.remote())
        group = weight_group_config([1], "gloo", timeout_s=60)
        ray.get([*learner.join_weight_group(group), *join_engines([engine], [1], group)], timeout=90)
        plan = learner.weight_plan(64 << 10)  # several buckets: units split across them
        assert len(plan.buckets) > 3
        req = WeightUpdateRequest(1, plan)
        stats, send = UpdatePusher([engine], shared=False).push(req, lambda: learner.send_weights(req.ticket()))
        assert stats[0].version == 1 and send["bytes"] == plan.total_bytes

        learner.save(str(tmp_path / "exported"))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_model)
        gens = ray.get(engine.generate.remote(probe_prompts, greedy))
        assert [g.token_ids for g in gens] == _transformers_greedy(tmp_path / "exported", tok, probe_prompts, greedy)

        sampling = Sampling(max_tokens=16, temperature=1.0, ignore_eos=True, seed=7)
        sampled = ray.get(engine.generate.remote(probe_prompts * 4, sampling))
        prompt_ids = [tok(p).input_ids for p in probe_prompts * 4]
        ours = learner.score(prompt_ids, [g.token_ids for g in sampled])
        diff = torch.cat([(torch.tensor(o) - torch.tensor(g.logprobs)).abs() for o, g in zip(ours, sampled)])
        print(f"learner TP=2 vs engine log-probs over {diff.numel()} sampled tokens: "
              f"max {diff.max().item():.2e}, mean {diff.mean().item():.2e}")
        assert diff.max().item() < ENGINE_LOGPROB_ATOL
        ray.get(learner.leave_weight_group())
        ray.get(engine.leave_weight_group.remote())
    finally:
        ray.get(engine.shutdown.remote())
        ray.kill(engine)


def _transformers_greedy(path, tok, prompts: list[str], greedy: Sampling) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(ref.generate(ids, max_new_tokens=greedy.max_tokens, do_sample=False, eos_token_id=None,
                                    pad_token_id=1)[0, ids.shape[1]:].tolist())
    return out


def test_tp2_learner_ranks_send_their_own_shards_to_a_tp2_engine_in_flight(trained_tp2, tiny_model, tmp_path,
                                                                           greedy, probe_prompts):
    """Learner TP = engine TP = 2 on one host, on the shared-memory twin of the ipc
    wire: each learner TP rank shares its own shards (no gather to rank 0) and engine
    worker w copies those of rank w. The update lands while 16 requests generate, none
    is dropped; the engine then decodes as transformers does with the learner's
    weights. A request of another TP size is refused and changes nothing."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from rlloop.weights.protocol import WeightUpdateError
    from rlloop.weights.shared import mailbox_name

    learner, _ = trained_tp2
    engine = engine_actor(EngineConfig(model=tiny_model, tensor_parallel_size=2, gpu_memory_utilization=0.05,
                                       max_model_len=512), name="mcore-shards/engine/0")
    try:
        ray.get(engine.ready.remote())
        group = weight_group_config([2], "shm", timeout_s=60, senders=2)
        ray.get([*learner.join_weight_group(group), *join_engines([engine], [2], group)], timeout=90)
        plan = learner.weight_plan(64 << 10)
        full = {p.name: p for p in learner.apply(lambda rank: rank.hf_params)}
        shapes = {p.name: p.shape for p in plan.params}
        q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
        assert shapes[q] == (full[q].shape[0] // 2, full[q].shape[1])
        assert shapes[o] == (full[o].shape[0], full[o].shape[1] // 2)
        assert shapes["model.embed_tokens.weight"] == full["model.embed_tokens.weight"].shape  # whole
        assert plan.total_bytes < sum(p.nbytes for p in full.values())

        n, max_tokens = 16, 400
        load = engine.generate.remote([f"{i}+{i}=" for i in range(n)],
                                      Sampling(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, seed=None))
        deadline = time.time() + 120
        while time.time() < deadline:
            s = ray.get(engine.stats.remote())
            if s["in_flight"] == n and s["kv_tokens"] >= n * 16:
                break
            time.sleep(0.02)
        pusher = UpdatePusher([engine], shared=True)
        req = WeightUpdateRequest(1, plan, tp_size=2)
        stats, send = pusher.push(req, lambda: learner.send_weights(req.ticket()))
        assert stats[0].version == 1 and stats[0].in_flight == n and send["bytes"] == plan.total_bytes
        assert Path("/dev/shm", mailbox_name(group.token, plan.key, 1)).exists(), "rank 1 shares its own shards"
        gens = ray.get(load, timeout=300)
        assert all(len(g.token_ids) == max_tokens and g.finish_reason == "length" for g in gens)
        assert any(g.version_start == 0 and g.version_end == 1 for g in gens)

        learner.save(str(tmp_path / "exported"))
        want = _transformers_greedy(tmp_path / "exported", AutoTokenizer.from_pretrained(tiny_model),
                                    probe_prompts, greedy)
        assert [g.token_ids for g in ray.get(engine.generate.remote(probe_prompts, greedy))] == want

        for bad in (WeightUpdateRequest(2, plan), WeightUpdateRequest(2, plan).ticket()):  # shards sent as whole
            with pytest.raises(WeightUpdateError, match="rejected"):
                ray.get(engine.update_weights.remote(bad))
        assert ray.get(engine.version.remote()) == 1
        assert [g.token_ids for g in ray.get(engine.generate.remote(probe_prompts, greedy))] == want
        ray.get(learner.leave_weight_group(group.token, plan.key))
        ray.get(engine.leave_weight_group.remote())
        assert not list(Path("/dev/shm").glob(f"rlloop-{group.token}-*")), "every rank's region is released"
    finally:
        ray.get(engine.shutdown.remote())
        ray.kill(engine)


def _uneven_samples(seed: int) -> list:
    """GRPO samples whose DP=2 shares (every other sample) differ in length 6x: a mean
    of per-rank token means would weigh the short rank's tokens 6x too much."""
    from rlloop.learner.policy import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(8):
        n = 12 if i % 2 == 0 else 2
        completion = torch.randint(2, 60, (n,), generator=g).tolist()
        behaviour = (-torch.rand(n, generator=g) * 3 - 0.1).tolist()
        out.append(Sample([5 + i, 17, 9], completion, behaviour, advantage=1.0 if i % 3 else -1.5,
                          reward=0.0, version_start=0, version_end=0))
    return out


@pytest.mark.parametrize("anchor", ["behaviour", "proximal"])
def test_dp2_with_uneven_lengths_equals_one_process(anchor, tiny_model, ray_cluster, tmp_path):
    """TP=1 DP=2 (micro-batches of 3) normalises by the token count of the whole batch,
    all-reduced over ranks, so three GRPO steps give the loss and the parameters of
    the one-process learner on the same batches."""
    from rlloop.learner.grpo import Objective

    # lr 3e-5: Adam's first steps move each parameter by ~lr whatever its gradient's
    # size, so float32 rounding in tiny gradients shows as ~lr * 1e-3 (1.5e-6 at 1e-3, six steps);
    # a wrong normalisation moves parameters by ~lr and the loss by ~0.1.
    kw = dict(lr=3e-5, objective=Objective(anchor=anchor), ppo_mini_batches=2 if anchor == "proximal" else 1)
    runs = {}
    for dp in (1, 2):
        learner = _learner(tiny_model, f"mcore-uneven-{anchor}-dp{dp}", dp=dp, micro_batch_size=3 if dp == 2 else 0,
                           **kw)
        try:
            losses = [learner.train_step(_uneven_samples(s))["loss"] for s in range(3)]
            learner.save(str(tmp_path / f"dp{dp}"))
        finally:
            learner.kill()
        runs[dp] = losses, load_file(str(tmp_path / f"dp{dp}" / "model.safetensors"))
    (loss1, p1), (loss2, p2) = runs[1], runs[2]
    param_diff = max((p1[k] - p2[k]).abs().max().item() for k in p1)
    print(f"{anchor}: losses dp1 {loss1} dp2 {loss2}, max |param diff| {param_diff:.2e}")
    assert max(abs(a - b) for a, b in zip(loss1, loss2)) < 1e-6
    assert param_diff < 1e-6


def _mixed_samples(seed: int) -> list:
    """12 GRPO samples: 3-token prompts, completions of 2 to 25 tokens."""
    from rlloop.learner.policy import Sample

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 26, (12,), generator=g).tolist()
    return [Sample([5 + i, 17, 9], torch.randint(2, 60, (n,), generator=g).tolist(),
                   (-torch.rand(n, generator=g) * 3 - 0.1).tolist(), advantage=1.0 if i % 3 else -1.5,
                   reward=0.0, version_start=0, version_end=0) for i, n in enumerate(lengths)]


def _step_gradients(learner, samples):
    """One GRPO step's accumulated gradients on this rank, with no optimizer step (the
    weights stay as they are), the padded size of every micro-batch it ran and the
    positions its output layer computed logits for."""
    seen, grads, rows = [], {}, []
    forward = learner.token_logprobs

    def recording(ids, at, reference=False):
        seen.append(ids.numel())
        return forward(ids, at, reference)

    def capture(lr):
        grads.update({n: p.grad.detach().clone() for n, p in learner.model.named_parameters()})
        return 0.0

    learner.token_logprobs, learner.step = recording, capture
    hook = learner.model.output_layer.register_forward_hook(lambda m, args, out: rows.append(out[0].shape[0]))
    try:
        metrics = learner.train_step(samples)
    finally:
        del learner.token_logprobs, learner.step
        hook.remove()
    return grads, metrics["loss"], seen, sum(rows)


def _against_local_attention(learner, samples):
    """This learner's log-probs and step gradients against a twin built with megatron's
    local attention on the same weights, stepping on the whole batch at once (today's
    learner); the twin is swapped in and out on this rank."""
    import dataclasses

    from rlloop.learner.megatron_learner import build_gpt

    prompts, completions = [s.prompt_ids for s in samples], [s.completion_ids for s in samples]
    ours = learner.score(prompts, completions)
    grads, loss, seen, logit_rows = _step_gradients(learner, samples)
    twin = build_gpt(learner.arch, learner.tp_size, learner.dtype, learner.device, "local")
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(learner.params[name])
    kept = learner.model, learner.attention, learner.cfg
    learner.model, learner.attention = twin, "local"
    learner.cfg = dataclasses.replace(learner.cfg, micro_batch_size=0, max_tokens_per_micro_batch=0)
    try:
        theirs = learner.score(prompts, completions)
        ref_grads, ref_loss, ref_seen, _ = _step_gradients(learner, samples)
    finally:
        learner.model, learner.attention, learner.cfg = kept
    import torch.distributed as dist

    worst = torch.tensor([  # the largest over every rank's shards (rank 0 answers apply)
        max(abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o, t)),
        max((grads[n] - ref_grads[n]).abs().max().item() for n in grads),
        -max(g.abs().max().item() for g in ref_grads.values())])
    dist.all_reduce(worst, dist.ReduceOp.MAX)
    return {"logprob_diff": worst[0].item(), "grad_diff": worst[1].item(), "grad_scale": -worst[2].item(),
            "loss": (loss, ref_loss), "micro_batches": seen, "whole_batch": ref_seen, "logit_rows": logit_rows}


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_attention_and_token_budget_equal_local_attention_on_the_whole_batch(tp, tiny_model, ray_cluster):
    """torch's SDPA core attention with length-sorted micro-batches of at most 96 padded
    tokens gives the log-probs and step gradients (fp32, within 1e-5) of megatron's
    local attention on the whole right-padded batch; no micro-batch exceeds the budget,
    and logits are computed at completion positions only."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probes run on the ranks
    budget = 96
    learner = _learner(tiny_model, f"mcore-sdpa-tp{tp}", tp=tp, attention="sdpa", max_tokens_per_micro_batch=budget)
    try:
        samples = _mixed_samples(7)
        r = learner.apply(_against_local_attention, samples)
        print(f"TP={tp}: {r}")
        assert r["logprob_diff"] <= 1e-5 and r["grad_diff"] <= 1e-5, r
        assert r["grad_scale"] > 1e-3  # the gradients compared are not all zero
        assert abs(r["loss"][0] - r["loss"][1]) <= 1e-6
        assert len(r["micro_batches"]) > 1 and max(r["micro_batches"]) <= budget
        assert r["whole_batch"] == [len(samples) * max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)]
        # the vocabulary is computed at completion positions only, never prompt or padding
        assert r["logit_rows"] == sum(len(s.completion_ids) for s in samples)
    finally:
        learner.kill()

"""Benchmark of exporting the megatron-core learner's weights to a vLLM engine beside it, in one run:

- step_ms:         one GRPO optimizer step (forward, vocab-parallel log-probs, backward,
                   optimizer) on --batch samples of 64 prompt + --completion tokens; median.
- floor_ms:        the update's bytes over the same wire with no gather, conversion or
                   loading: a raw broadcast (nccl, gloo) or one copy out of the shared
                   region into an engine-owned buffer (ipc, shm).
- export_ms:       one full update from the learner: per-bucket gather over TP ranks,
                   Megatron -> HF conversion, pack, broadcast, engine load; median.
- logprob_diff_*:  |learner log-prob - engine log-prob| over tokens the engine sampled,
                   after the learner's weights were exported to it (same weights).
- greedy_match:    engine greedy output after the export equals the learner's own
                   greedy argmax continuation (teacher-forced check).

CPU:  python scripts/bench_export.py --model tiny --tp 2 --json runs/bench_export_cpu.json
GPU:  python scripts/bench_export.py --model qwen2.5-1.5b --tp 1 --json out.json
      (learner and engine each on their own GPU when there are enough, over NCCL;
       on a single GPU they share it and the weights go over CUDA IPC)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import ray
import torch

from rlloop.actors.engine import EngineConfig, Sampling, engine_actor
from rlloop.actors.learner_group import LearnerGroup
from rlloop.actors.weight_sync import UpdatePusher, auto_backend, join_engines, weight_group_config
from rlloop.learner.policy import LearnerConfig, Sample
from rlloop.models.presets import model_dir
from rlloop.weights.protocol import WeightUpdateRequest
from rlloop.weights.shared import SHARED_WIRES

from probes import FloorEngine, greedy_agreement, learner_send_floor


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | qwen2.5-1.5b | qwen2.5-7b")
    ap.add_argument("--tp", type=int, default=1, help="learner tensor-parallel size")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default 64 GPU, 16 CPU)")
    ap.add_argument("--completion", type=int, default=None, help="completion tokens (default 256 GPU, 32 CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=float, default=None, help="default: 1 on CPU, 512 on GPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    gpus = torch.cuda.device_count()
    dtype = "bfloat16" if gpus else "float32"
    batch = args.batch or (64 if gpus else 16)
    completion = args.completion or (256 if gpus else 32)
    bucket_mb = args.bucket_mb or (512 if gpus else 1)
    path = str(model_dir(args.model, os.path.join(tempfile.mkdtemp(prefix="rlloop-bench-"), "model"),
                         dtype=dtype, weights=True))
    # Own GPUs for engine and every learner rank when there are enough; else all share GPU 0.
    own = gpus >= args.tp + 1
    engine_gpus, learner_gpus = (1, 1) if own else ((0.5, 0.5 / args.tp) if gpus else (0, 0))

    ray.init(include_dashboard=False, log_to_driver=False)
    engine = engine_actor(EngineConfig(model=path, dtype=dtype, gpu_memory_utilization=0.3 if gpus else 0.05,
                                       max_model_len=1024, enforce_eager=True),
                          name="bench/engine/0", num_gpus=engine_gpus, cls=FloorEngine)
    ray.get(engine.ready.remote())
    learner = LearnerGroup(LearnerConfig(model=path, backend="megatron", tensor_parallel_size=args.tp,
                                         dtype=dtype, lr=1e-6, micro_batch_size=4, gpus=learner_gpus), "bench")
    learner.wait_ready(time.time() + 600)
    # The wire a run would take (weights.backend=auto): ipc on a shared GPU, nccl
    # between GPUs, shm on CPU.
    backend = auto_backend(learner.placement(), [ray.get(engine.ready.remote())])
    group = weight_group_config([1], backend, timeout_s=300)
    ray.get([*learner.join_weight_group(group), *join_engines([engine], [1], group)])
    plan = learner.weight_plan(int(bucket_mb * 2**20))
    pusher = UpdatePusher([engine], shared=backend in SHARED_WIRES)
    version = 0

    def export():
        nonlocal version
        version += 1
        req = WeightUpdateRequest(version, plan)
        t0 = time.perf_counter()
        stats, send = pusher.push(req, lambda: learner.send_weights(req.ticket()))
        return (time.perf_counter() - t0) * 1e3, stats[0], send

    export()  # warm-up: buffers, receiver state, first collectives
    print("exported once", flush=True)
    floor = []
    for _ in range(args.repeats):
        raw = WeightUpdateRequest(version, plan)
        if pusher.shared:  # the region first, then the workers' copy out of it
            learner.apply(learner_send_floor, plan)
            floor.append(ray.get(engine.receive_raw.remote(raw))["worker_ms"])
        else:
            receiving = engine.receive_raw.remote(raw)
            floor.append(learner.apply(learner_send_floor, plan)["send_ms"])
            ray.get(receiving)
    exports = [export() for _ in range(args.repeats)]

    # Log-prob parity on tokens the engine samples with the exported weights.
    g = torch.Generator().manual_seed(0)
    vocab_hi = 90 if args.model == "tiny" else 5000
    prompts = [torch.randint(2, vocab_hi, (16,), generator=g).tolist() for _ in range(16)]
    sampled = ray.get(engine.generate.remote(prompts, Sampling(max_tokens=32, temperature=1.0,
                                                               ignore_eos=True, seed=1)))
    ours = learner.score(prompts, [s.token_ids for s in sampled])
    diff = torch.cat([(torch.tensor(o) - torch.tensor(s.logprobs)).abs() for o, s in zip(ours, sampled)])
    greedy = ray.get(engine.generate.remote(prompts[:4], Sampling(max_tokens=16, temperature=0.0,
                                                                  ignore_eos=True)))
    # The learner's argmax at every position of the engine's greedy sequence: equal
    # when both compute the same function (bf16 ties aside).
    argmax_agree = learner.apply(greedy_agreement, prompts[:4], [s.token_ids for s in greedy])

    samples = [Sample(prompt_ids=prompts[i % len(prompts)] * 4,
                      completion_ids=torch.randint(2, vocab_hi, (completion,), generator=g).tolist(),
                      behaviour_logprobs=[-1.0] * completion, advantage=(-1.0) ** i, reward=0.0,
                      version_start=0, version_end=0) for i in range(batch)]
    learner.train_step(samples)  # warm-up
    steps = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        m = learner.train_step(samples)
        steps.append(((time.perf_counter() - t0) * 1e3, m["train_ms"]))

    result = {
        "device": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus, "model": args.model,
        "dtype": dtype, "learner_tp": args.tp, "weight_backend": backend, "bytes": plan.total_bytes,
        "buckets": len(plan.buckets),
        "step_ms": statistics.median(s[0] for s in steps),
        "step_ms_in_learner": statistics.median(s[1] for s in steps),
        "step_tokens": batch * (64 + completion),
        "floor_ms": statistics.median(floor),
        "export_ms": statistics.median(e[0] for e in exports),
        "export_send_ms": statistics.median(e[2]["send_ms"] for e in exports),
        "export_receive_ms": statistics.median(e[1].receive_ms for e in exports),
        "logprob_diff_max": diff.max().item(), "logprob_diff_mean": diff.mean().item(),
        "logprob_tokens": diff.numel(), "greedy_argmax_agreement": argmax_agree,
        "versions": {"vllm": __import__("vllm").__version__, "torch": torch.__version__, "ray": ray.__version__,
                     "megatron-core": __import__("megatron.core").core.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    result["export_over_floor"] = result["export_ms"] / result["floor_ms"]
    print(json.dumps(result, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    ray.get(engine.shutdown.remote())
    learner.kill()
    ray.shutdown()


if __name__ == "__main__":
    main()

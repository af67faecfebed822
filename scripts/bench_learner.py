"""Benchmark of the megatron learner's GRPO step at RL shapes: step time, tokens/s and
MFU for each learner variant, one after another on the same samples (one run).

Samples are what an RL batch looks like: --samples of them, prompts uniform in
--prompt MIN:MAX tokens, responses long-tailed (log-normal around --response-median,
clipped to --response MIN:MAX), random token ids, seeded. Each variant is a set of
learner config overrides; the defaults are

  before  attention=local, micro_batch_size=4: megatron's unfused attention over
          right-padded micro-batches of 4 samples in arrival order (the learner as
          it was)
  after   attention=auto, max_tokens_per_micro_batch=--budget: fused attention (TE if
          importable, else torch SDPA) over length-sorted micro-batches of at most
          --budget padded tokens

Per variant: the median step over --repeats (after one warm-up step), all tokens per
second (prompt + response, what the learner computes), learner_tflops / learner_mfu
as the learner reports them (model FLOPs, learner/flops.py; peak by device name),
the padded share of computed tokens, and the GPU's peak memory. With --profile, one
more step runs under torch.profiler and its kernel time is summed by category
(gemm, attention, softmax/cross-entropy, norm, elementwise, optimizer, communication).
A variant that runs out of memory is recorded with its error and the next one runs.
With --sleeping-engine, a vLLM engine of the same model starts first on the same GPU,
sleeps (level 1: weights to host memory, KV cache dropped) and stays asleep beside
every variant, as in a colocated run; what it still holds is recorded. The JSON is
rewritten after every variant.

CPU:  python scripts/bench_learner.py --model tiny --samples 16 --prompt 8:24 --response 4:64 \\
          --response-median 16 --budget 512 --json runs/bench_learner_cpu.json
GPU:  python scripts/bench_learner.py --model qwen2.5-1.5b --profile --json out.json
      python scripts/bench_learner.py --model qwen2.5-7b --sleeping-engine \\
          --variant offload:max_tokens_per_micro_batch=8192,optimizer_offload=0.5 ...
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import ray
import torch
from ray import cloudpickle

from rlloop.actors.learner_group import LearnerGroup
from rlloop.learner.policy import LearnerConfig, Sample, micro_batches
from rlloop.models.presets import model_dir
from rlloop.run_report import environment

CATEGORIES = (  # first match wins, on the lower-cased kernel name
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "::mm", "bmm", "addmm")),
    ("softmax/cross-entropy", ("softmax", "cross_entropy", "logsumexp", "nll")),
    ("norm", ("norm",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("elementwise", ("elementwise", "vectorized", "copy", "fill", "cat", "index", "reduce", "mul", "add",
                     "exp", "where", "silu", "swiglu", "rope", "rotary")),
)


def rl_samples(n: int, prompt: tuple[int, int], response: tuple[int, int], median: int, vocab: int,
               seed: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(prompt[0], prompt[1] + 1, (), generator=g))
        r = math.exp(math.log(median) + 0.8 * torch.randn((), generator=g).item())  # long right tail
        r = int(min(max(r, response[0]), response[1]))
        out.append(Sample(prompt_ids=torch.randint(2, vocab, (p,), generator=g).tolist(),
                          completion_ids=torch.randint(2, vocab, (r,), generator=g).tolist(),
                          behaviour_logprobs=[-1.0] * r, advantage=1.0 if i % 2 else -1.0, reward=0.0,
                          version_start=0, version_end=0))
    return out


def peak_memory(learner, reset: bool) -> float | None:
    """This rank's peak GPU memory since the last reset, GiB."""
    if learner.device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(learner.device) / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats(learner.device)
    return peak


def profiled_step(learner, samples) -> dict:
    """One train step under torch.profiler: kernel time by category, ms."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if learner.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        learner.train_step(samples)
    by_cat: dict[str, float] = {}
    top = []
    on_gpu = learner.device.type == "cuda"
    for e in prof.key_averages():
        if on_gpu and e.device_type != torch.autograd.DeviceType.CUDA:
            continue  # kernels only: an aten op's device time is its kernels' again
        us = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        if us <= 0:
            continue
        name = e.key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        by_cat[cat] = by_cat.get(cat, 0.0) + us / 1e3
        top.append((us / 1e3, e.key[:100], cat))
    top.sort(reverse=True)
    return {"kernel_ms_by_category": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"ms": round(ms, 2), "name": n, "category": c} for ms, n, c in top[:15]]}


def parse_variant(text: str) -> tuple[str, dict]:
    """"name:key=value,key=value" -> (name, learner overrides)."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        field = LearnerConfig.__dataclass_fields__.get(key)
        if field is None:
            raise SystemExit(f"--variant {name}: {key!r} is not a learner config field")
        kind = type(getattr(LearnerConfig(model="x"), key))
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else (
            kind(value) if kind in (int, float) else value)
    return name, overrides


def sleeping_engine(path: str, dtype: str) -> tuple[object, dict]:
    """A vLLM engine of the model on the learner's GPU (half of it in Ray's count), put
    to sleep at level 1: (its actor, what sleeping released and what it still holds)."""
    from rlloop.actors.engine import engine_actor
    from rlloop.actors.engine_io import EngineConfig

    engine = engine_actor(EngineConfig(model=path, dtype=dtype, gpu_memory_utilization=0.3, max_model_len=2048,
                                       enforce_eager=True, enable_sleep_mode=True), "bench-engine", num_gpus=0.5)
    ray.get(engine.version.remote(), timeout=900)
    slept = ray.get(engine.sleep.remote(1))
    return engine, {**slept, "gpu_used_gib_while_asleep": float(gpu_query("memory.used")) / 1024}


def gpu_query(field: str) -> str:
    """nvidia-smi's answer for GPU 0: this process never opens a CUDA context (it
    would hold memory the learner needs)."""
    import subprocess

    out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def run_variant(name: str, overrides: dict, path: str, dtype: str, gpus: float, samples: list[Sample],
                args) -> dict:
    cfg = LearnerConfig(model=path, backend="megatron", dtype=dtype, lr=1e-6, gpus=gpus, **overrides)
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    mbs = micro_batches(lengths, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in mbs)
    row = {"variant": name, "overrides": overrides, "micro_batches": len(mbs),
           "largest_micro_batch_tokens": max(len(b) * max(lengths[i] for i in b) for b in mbs),
           "padded_fraction": 1 - sum(lengths) / computed}
    learner = LearnerGroup(cfg, f"bench-{name}")
    try:
        learner.wait_ready(time.time() + 900)
        learner.train_step(samples)  # warm-up: kernels, optimizer state
        learner.apply(peak_memory, True)
        steps = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            m = learner.train_step(samples)
            steps.append(((time.perf_counter() - t0) * 1e3, m))
        ms = statistics.median(s[0] for s in steps)
        mid = sorted(steps, key=lambda s: s[0])[len(steps) // 2][1]
        row.update(step_ms=ms, step_ms_all=[round(s[0], 1) for s in steps],
                   tok_s=sum(lengths) / ms * 1e3,
                   response_tok_s=sum(len(s.completion_ids) for s in samples) / ms * 1e3,
                   learner_tflops=mid.get("learner_tflops"), learner_mfu=mid.get("learner_mfu"),
                   peak_memory_gib=learner.apply(peak_memory, False), loss=mid["loss"])
        if args.profile:
            row.update(learner.apply(profiled_step, samples))
    except Exception as e:  # out of memory, or a variant this device cannot run: record, go on
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
    finally:
        learner.kill()
    print(f"[bench_learner] {json.dumps(row)}", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | qwen2.5-1.5b | qwen2.5-7b (random weights)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--prompt", default="64:256", help="prompt tokens MIN:MAX (uniform)")
    ap.add_argument("--response", default="64:1024", help="response tokens MIN:MAX (log-normal, clipped)")
    ap.add_argument("--response-median", type=int, default=256)
    ap.add_argument("--budget", type=int, default=16384, help="max_tokens_per_micro_batch of `after`")
    ap.add_argument("--variant", action="append", default=None,
                    help="name:key=value,... learner overrides (repeatable); default: before and after")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sleeping-engine", action="store_true", help="a sleeping vLLM engine on the same GPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    gpus = torch.cuda.device_count()
    dtype = "bfloat16" if gpus else "float32"
    variants = [parse_variant(v) for v in (args.variant or [
        "before:attention=local,micro_batch_size=4",
        f"after:attention=auto,max_tokens_per_micro_batch={args.budget}"])]
    path = str(model_dir(args.model, os.path.join(tempfile.mkdtemp(prefix="rlloop-bench-"), "model"),
                         dtype=dtype, weights=True))
    vocab = 90 if args.model == "tiny" else 5000
    span = lambda s: tuple(int(x) for x in s.split(":"))  # noqa: E731
    samples = rl_samples(args.samples, span(args.prompt), span(args.response), args.response_median, vocab, seed=0)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probes run on the learner's rank
    ray.init(include_dashboard=False, log_to_driver=False)
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    result = {
        "device": gpu_query("name") if gpus else "cpu", "model": args.model, "dtype": dtype,
        "samples": args.samples, "tokens": sum(lengths),
        "response_tokens": sum(len(s.completion_ids) for s in samples),
        "length_p50_p90_max": [statistics.quantiles(lengths, n=10)[4], statistics.quantiles(lengths, n=10)[8],
                               max(lengths)],
        "variants": [], "versions": environment(("vllm", "torch", "ray", "megatron.core", "transformers")),
        "date": time.strftime("%Y-%m-%d"),
    }
    learner_gpus = 1 if gpus else 0
    if args.sleeping_engine:
        engine, result["sleeping_engine"] = sleeping_engine(path, dtype)  # held: the actor lives while its handle does
        print(f"[bench_learner] sleeping engine: {result['sleeping_engine']}", flush=True)
        learner_gpus = 0.5
    for name, overrides in variants:
        result["variants"].append(run_variant(name, overrides, path, dtype, learner_gpus, samples, args))
        if args.json:  # after every variant: a lost machine keeps what ran
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()

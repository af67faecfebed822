"""Benchmark of `GenerationEngine.swap_model`: an engine actor replaces its base model in
place, against a cold start of a new engine actor on the same model, in one run.

- cold_start_s:  a new engine actor until it is ready (Ray actor, imports, vLLM start),
                 per model, each on an otherwise empty GPU (the first model's is the
                 start of the actor that then swaps).
- swaps:         --swaps swaps in one actor, alternating the models; per swap the
                 release (old engine core gone) and load times, and the free GPU memory
                 (NVML, this process opens no CUDA context) before, after the release
                 and after the load; requests sent during each swap must complete on
                 the new model.
- memory_flat:   free GPU memory after each load of the same model, the spread across
                 the swaps (a leak grows it).

GPU:  python scripts/bench_hot_swap.py --models qwen2.5-1.5b qwen2.5-7b --json out.json
CPU:  python scripts/bench_hot_swap.py --models qwen2.5-0.5b qwen2.5-0.5b --swaps 2
      (dummy-weight architectures; CPU memory is process RSS)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import ray
import torch

from rlloop.actors.engine import EngineConfig, Sampling, engine_actor
from rlloop.models.presets import model_dir
from rlloop.run_report import environment


def gpu_free_bytes() -> int | None:
    if not torch.cuda.is_available():
        return None
    from vllm.third_party import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free


def requests(engine, n: int = 8, max_tokens: int = 32):
    prompts = [[100 + i, 200 + i, 300 + i] for i in range(n)]
    return engine.generate.remote(prompts, Sampling(max_tokens=max_tokens, temperature=1.0, ignore_eos=True,
                                                    logprobs=False))


def complete(gens, n: int = 8, max_tokens: int = 32) -> bool:
    return len(gens) == n and all(len(g.token_ids) == max_tokens for g in gens)


def cold_start(config: EngineConfig, keep: bool = False) -> tuple[object, dict]:
    """A new engine actor on `config.model` until it serves; returns it (`keep`) or
    shuts it down."""
    free_before = gpu_free_bytes()
    t0 = time.perf_counter()
    engine = engine_actor(config, name=f"bench/engine/{time.monotonic_ns()}")
    ray.get(engine.ready.remote())
    out = {"cold_start_s": time.perf_counter() - t0, "gpu_free_before": free_before,
           "gpu_free_after": gpu_free_bytes(), "requests_complete": complete(ray.get(requests(engine)))}
    print(f"cold start {os.path.basename(config.model)}: {json.dumps(out)}", flush=True)
    if not keep:
        ray.get(engine.shutdown.remote())
        ray.kill(engine)
        engine = None
    return engine, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs=2, default=["qwen2.5-1.5b", "qwen2.5-7b"])
    ap.add_argument("--swaps", type=int, default=4)
    ap.add_argument("--gpu-mem", type=float, default=0.3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available()
    dtype = "bfloat16" if gpu else "float32"
    tmp = tempfile.mkdtemp(prefix="rlloop-swap-")
    paths = [str(model_dir(m, os.path.join(tmp, f"{i}-{m}"), dtype=dtype)) for i, m in enumerate(args.models)]
    ray.init(include_dashboard=False, log_to_driver=False)
    base = EngineConfig(model=paths[0], dtype=dtype, load_format="dummy", gpu_memory_utilization=args.gpu_mem,
                        max_model_len=1024, max_num_seqs=64, enforce_eager=True)
    result = {"models": args.models, "device": torch.cuda.get_device_name(0) if gpu else "cpu",
              "gpu_memory_utilization": args.gpu_mem, "environment": environment(("vllm", "torch", "ray", "transformers")),
              "cold": {}}
    engine, result["cold"][args.models[0]] = cold_start(base, keep=True)  # the actor that swaps
    swaps = []
    for i in range(args.swaps):
        target = (i + 1) % 2
        t0 = time.perf_counter()
        swap = engine.swap_model.remote(paths[target])
        time.sleep(0.5)  # these arrive mid-swap: they wait, then run on the new model
        during = requests(engine)
        record = ray.get(swap)
        wall = time.perf_counter() - t0
        gens = ray.get(during)
        record = {"to": args.models[target], "wall_s": wall, **record,
                  "requests_during_swap_complete": complete(gens)}
        swaps.append(record)
        print(f"swap {i} -> {args.models[target]}: {json.dumps(record)}", flush=True)
    ray.get(engine.shutdown.remote())
    ray.kill(engine)
    time.sleep(1.0)  # the engine core's process exits after its actor
    if args.models[1] not in result["cold"]:
        result["cold"][args.models[1]] = cold_start(replace(base, model=paths[1]))[1]

    result["swaps"] = swaps
    for i, m in enumerate(args.models):
        mine = [s for s in swaps if s["to"] == m]
        if not mine:
            continue
        loads = [s["load_ms"] / 1e3 for s in mine]
        after = [s["memory"]["after"].get("gpu_free_bytes", 0) or s["memory"]["after"]["rss_mb"] for s in mine]
        result[m] = {"swap_load_s_median": statistics.median(loads),
                     "swap_release_s_median": statistics.median(s["release_ms"] / 1e3 for s in mine),
                     "cold_start_s": result["cold"][m]["cold_start_s"],
                     "swap_over_cold": statistics.median(loads) / result["cold"][m]["cold_start_s"],
                     "after_load_spread": max(after) - min(after), "after_load_unit": "bytes free" if gpu else "MB rss"}
    result["all_requests_complete"] = (all(s["requests_during_swap_complete"] for s in swaps)
                                       and all(c["requests_complete"] for c in result["cold"].values()))
    print(json.dumps({k: v for k, v in result.items() if k not in ("swaps", "environment")}, indent=1), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    ok = result["all_requests_complete"]
    ray.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

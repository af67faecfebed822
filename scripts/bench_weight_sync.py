"""Benchmark of in-flight weight updates, sender -> GenerationEngine, in one run:

- floor_ms:       raw broadcast of the plan's bytes over the same weight group (no pack,
                  no load): what the wire costs.
- update_ms:      one full update, from the sender's side (validate, broadcast, load,
                  all engines back): median over --updates, no generation running.
- stall_ms:       generation pause per in-flight update (pause keep .. resume), median.
- tok_s_plain / tok_s_inflight: generation throughput without / with an update each
                  --update-every seconds.
- all_requests_complete: every request of the in-flight run reached its full length.
- outputs_match_reference: greedy output after an update equals the reference
                  (tiny: transformers on the same weights; presets: the same weights
                  loaded through vLLM's own checkpoint loader).

CPU:  python scripts/bench_weight_sync.py --model tiny --json runs/bench_cpu.json
GPU:  python scripts/bench_weight_sync.py --model qwen2.5-1.5b --json out.json
      (engine on one GPU, sender on another, load_format=dummy)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import ray
import torch

from rlloop.actors.engine import EngineConfig, Sampling, engine_actor
from rlloop.actors.weight_sync import form_weight_group, push_update
from rlloop.models.presets import model_dir
from rlloop.models.schema import checkpoint_schema
from rlloop.weights.protocol import DTYPES, WeightUpdateRequest, make_plan


def random_weights(schema, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, p in schema.items():
        t = torch.empty(p.shape, dtype=DTYPES[p.dtype], device=device)
        if "norm" in name:
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=g)
        out[name] = t
    return out


def tie(tensors, tied: bool):
    """A tied head is the embedding, sent under both names (see validate_request)."""
    if tied and "lm_head.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    return tensors


def generate_load(engine, n_prompts, max_tokens, vocab_hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab_hi, (16,), generator=g).tolist() for _ in range(n_prompts)]
    sampling = Sampling(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, logprobs=False)
    return engine.generate.remote(prompts, sampling)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | qwen2.5-1.5b | qwen2.5-7b")
    ap.add_argument("--json", default=None)
    ap.add_argument("--bucket-mb", type=float, default=None, help="default: 1 on CPU, 512 on GPU")
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--update-every", type=float, default=1.0)
    ap.add_argument("--gpu-mem", type=float, default=0.6, help="engine's GPU memory fraction")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs / compile (fast start)")
    ap.add_argument("--mode", default="auto", help="receive mode: auto | direct | checkpoint")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available()
    dtype = "bfloat16" if gpu else "float32"
    bucket_mb = args.bucket_mb or (512 if gpu else 1)
    n_prompts = args.prompts or (512 if gpu else 64)
    max_tokens = args.max_tokens or (512 if gpu else 400)
    tmp = tempfile.mkdtemp(prefix="rlloop-bench-")
    path = str(model_dir(args.model, os.path.join(tmp, "model"), dtype=dtype))

    ray.init(include_dashboard=False, log_to_driver=False)
    cfg = EngineConfig(model=path, dtype=dtype, load_format="auto" if args.model == "tiny" else "dummy",
                       gpu_memory_utilization=args.gpu_mem if gpu else 0.1, max_model_len=2048 if gpu else 512,
                       max_num_seqs=512 if gpu else 64, enforce_eager=args.eager or not gpu,
                       receive_mode=args.mode)
    engine = engine_actor(cfg, name="bench/engine/0")
    info = ray.get(engine.ready.remote())
    device, backend = "cpu", "gloo"
    if gpu:
        free = [i for i in range(torch.cuda.device_count()) if i not in info["gpus"]]
        # NCCL refuses two ranks on one GPU: with a single GPU the sender shares the
        # engine's GPU and the group runs over gloo (numbers then are not NCCL's).
        device, backend = (f"cuda:{free[0]}", "nccl") if free else (f"cuda:{info['gpus'][0]}", "gloo")
        torch.cuda.set_device(device)
    print(f"engine ready {info}; sender on {device} over {backend}", flush=True)

    schema = checkpoint_schema(path, DTYPES[dtype])
    from transformers import AutoConfig

    tied = bool(getattr(AutoConfig.from_pretrained(path), "tie_word_embeddings", False))
    tensors = tie(random_weights(schema, device, seed=1), tied)
    plan = make_plan(list(schema.values()), bucket_bytes=int(bucket_mb * 2**20))
    sender = form_weight_group([engine], [cfg.tensor_parallel_size], backend, device)
    version = 0

    def push(mode=None):
        nonlocal version
        version += 1
        req = WeightUpdateRequest(version, plan)
        t0 = time.perf_counter()
        stats, send = push_update([engine], req, lambda: sender.send(req, tensors), mode=mode)
        return (time.perf_counter() - t0) * 1e3, stats[0], send

    # Warm-up: builds per-plan buffers on both sides, first NCCL kernels.
    _, first, _ = push()
    print(f"receive mode: {first.mode}", flush=True)

    floor = []
    for _ in range(args.updates):
        req = WeightUpdateRequest(version, plan)
        raw = engine.receive_raw.remote(req)
        floor.append(sender.send_raw(plan)["send_ms"])
        ray.get(raw)
    updates = [push() for _ in range(args.updates)]
    update_ms = statistics.median(u[0] for u in updates)

    # Correctness: greedy output after an update vs ground truth.
    greedy = Sampling(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=False)
    vocab_hi = 90 if args.model == "tiny" else 5000
    probe = [torch.randint(2, vocab_hi, (12,), generator=torch.Generator().manual_seed(i)).tolist()
             for i in range(4)]
    tensors = tie(random_weights(schema, device, seed=7), tied)
    push()
    got = [g.token_ids for g in ray.get(engine.generate.remote(probe, greedy))]
    if args.model == "tiny":
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ref_model.load_state_dict({k: v.cpu() for k, v in tensors.items()}, strict=False)
        want = [ref_model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False,
                                   eos_token_id=None, pad_token_id=1)[0, len(p):].tolist() for p in probe]
    else:
        push(mode="checkpoint")  # same weights through vLLM's own loader
        want = [g.token_ids for g in ray.get(engine.generate.remote(probe, greedy))]
    outputs_match = got == want

    # Throughput, plain then with an update every --update-every seconds.
    ray.get(generate_load(engine, min(n_prompts, 16), 8, vocab_hi))  # warm
    t0 = time.perf_counter()
    gens = ray.get(generate_load(engine, n_prompts, max_tokens, vocab_hi))
    tok_s_plain = sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t0)

    stalls, inflight_updates = [], []
    done = threading.Event()

    def updater():
        while not done.wait(args.update_every):
            ms, st, _ = push()
            stalls.append(st.pause_ms)
            inflight_updates.append(ms)

    th = threading.Thread(target=updater, daemon=True)
    t0 = time.perf_counter()
    fut = generate_load(engine, n_prompts, max_tokens, vocab_hi, seed=1)
    th.start()
    gens = ray.get(fut)
    elapsed = time.perf_counter() - t0
    done.set()
    th.join()
    tok_s_inflight = sum(len(g.token_ids) for g in gens) / elapsed
    complete = all(len(g.token_ids) == max_tokens for g in gens) and len(gens) == n_prompts

    result = {
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "model": args.model, "dtype": dtype, "backend": backend, "sender_device": device, "bytes": plan.total_bytes, "buckets": len(plan.buckets),
        "receive_mode": first.mode,
        "floor_ms": statistics.median(floor), "floor_gbps": plan.bucket_bytes / statistics.median(floor) / 1e6,
        "update_ms": update_ms,
        "update_receive_ms": statistics.median(u[1].receive_ms for u in updates),
        "update_send_ms": statistics.median(u[2]["send_ms"] for u in updates),
        "update_gbps": plan.total_bytes / update_ms / 1e6,
        "stall_ms": statistics.median(stalls) if stalls else None,
        "stall_ms_max": max(stalls) if stalls else None,
        "inflight_updates": len(stalls),
        "tok_s_plain": tok_s_plain, "tok_s_inflight": tok_s_inflight,
        "inflight_ratio": tok_s_inflight / tok_s_plain,
        "all_requests_complete": complete, "outputs_match_reference": outputs_match,
        "versions": {"vllm": __import__("vllm").__version__, "torch": torch.__version__,
                     "ray": ray.__version__},
        "prompts": n_prompts, "max_tokens": max_tokens, "eager": cfg.enforce_eager,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    ray.get(engine.shutdown.remote())
    ray.shutdown()
    return 0 if (complete and outputs_match) else 1


if __name__ == "__main__":
    sys.exit(main())

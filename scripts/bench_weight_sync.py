"""Benchmark of in-flight weight updates, sender -> GenerationEngine, all in one run on
the same model and bytes, for each wire (--wires):

- floor_ms:       the wire with no packing and no loading: a raw broadcast of the
                  plan's bytes (gloo, nccl), or one copy of them from the sender's
                  shared region into an engine-owned buffer (shm, ipc_packed: through a
                  shared-memory segment / CUDA IPC handle).
- update_ms:      one full update from the sender's side (validate, send, load, engine
                  back), median over --updates, no generation running; its stall
                  (pause .. resume), the worker's receive+load and the sender's send.
- tok_s_plain / tok_s_inflight: generation throughput without / with an update each
                  --update-every seconds (first wire); all requests must complete.
- outputs_match_reference: greedy output after an update equals the reference
                  (tiny: transformers on the same weights; presets: the same weights
                  loaded through vLLM's own checkpoint loader).
- GPU: sleep/wake of the engine (memory released, wake time), and vLLM's own IPC
  weight-transfer engine on the same tensors (`weight_transfer_config={"backend":
  "ipc"}`, its trainer-side `trainer_send_weights`), the peer to beat.

Wires: ipc (CUDA IPC, the sender's tensors shared in place: one copy per update),
ipc_packed (CUDA IPC through a packed region), shm (shared memory, CPU), gloo, nccl.

CPU:  python scripts/bench_weight_sync.py --model tiny --json runs/bench_cpu.json
GPU:  python scripts/bench_weight_sync.py --model qwen2.5-1.5b --json out.json
      (one GPU: engine and sender share it; wires ipc, ipc_packed, gloo)
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
from rlloop.actors.weight_sync import UpdatePusher, form_weight_group
from rlloop.models.presets import model_dir
from rlloop.models.schema import checkpoint_schema
from rlloop.weights.protocol import DTYPES, WeightUpdateRequest, make_plan
from rlloop.weights.sender import buckets_of

from probes import FloorEngine, send_floor


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


class Bench:
    """One engine, the sender's tensors and plan; wires are formed one after another."""

    def __init__(self, engine, tensors, plan, device):
        self.engine, self.tensors, self.plan, self.device = engine, tensors, plan, device
        self.version = 0
        self.sender = None

    def use_wire(self, wire: str):
        if self.sender is not None:
            self.close()
        backend = "ipc" if wire.startswith("ipc") else wire
        self.sender = form_weight_group([self.engine], [1], backend, self.device, in_place=wire == "ipc")
        self.pusher = UpdatePusher([self.engine], self.sender.shared)

    def close(self):
        self.sender.close()
        ray.get(self.engine.leave_weight_group.remote())
        self.sender = None

    def push(self, mode=None, kv=None):
        self.version = self.pusher.version + 1  # the engine's, whichever plan came before
        req = WeightUpdateRequest(self.version, self.plan)
        t0 = time.perf_counter()
        stats, send = self.pusher.push(req, lambda: self.sender.send(req, buckets_of(self.plan, self.tensors)),
                                       mode=mode, kv=kv)
        return (time.perf_counter() - t0) * 1e3, stats[0], send

    def floor_ms(self) -> float | None:
        """The wire alone: a raw broadcast, or one copy out of the shared region."""
        if self.sender.in_place:
            return None
        req = WeightUpdateRequest(self.version, self.plan)
        if self.sender.shared:
            send_floor(self.sender, self.plan)
            return ray.get(self.engine.receive_raw.remote(req))["worker_ms"]
        raw = self.engine.receive_raw.remote(req)
        ms = send_floor(self.sender, self.plan)["send_ms"]
        ray.get(raw)
        return ms

    def measure(self, wire: str, updates: int) -> dict:
        self.use_wire(wire)
        _, first, _ = self.push()  # warm-up: per-plan state on both sides
        floors = [self.floor_ms() for _ in range(updates)]
        runs = [self.push() for _ in range(updates)]
        update_ms = statistics.median(r[0] for r in runs)
        out = {"receive_mode": first.mode, "update_ms": update_ms,
               "update_ms_all": [round(r[0], 3) for r in runs],
               "stall_ms": statistics.median(r[1].pause_ms for r in runs),
               "receive_ms": statistics.median(r[1].receive_ms for r in runs),
               "send_ms": statistics.median(r[2]["send_ms"] for r in runs),
               "update_gbps": self.plan.total_bytes / update_ms / 1e6}
        if floors[0] is not None:
            out["floor_ms"] = statistics.median(floors)
            out["floor_ms_all"] = [round(f, 3) for f in floors]
            out["floor_gbps"] = self.plan.bucket_bytes / out["floor_ms"] / 1e6
        print(f"{wire}: {json.dumps(out)}", flush=True)
        return out


def throughput(bench: Bench, n_prompts, max_tokens, vocab_hi, update_every) -> dict:
    ray.get(generate_load(bench.engine, min(n_prompts, 16), 8, vocab_hi))  # warm
    t0 = time.perf_counter()
    gens = ray.get(generate_load(bench.engine, n_prompts, max_tokens, vocab_hi))
    tok_s_plain = sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t0)
    stalls, walls = [], []
    done = threading.Event()

    def updater():
        while not done.wait(update_every):
            ms, st, _ = bench.push()
            stalls.append(st.pause_ms)
            walls.append(ms)

    th = threading.Thread(target=updater, daemon=True)
    t0 = time.perf_counter()
    fut = generate_load(bench.engine, n_prompts, max_tokens, vocab_hi, seed=1)
    th.start()
    gens = ray.get(fut)
    elapsed = time.perf_counter() - t0
    done.set()
    th.join()
    tok_s_inflight = sum(len(g.token_ids) for g in gens) / elapsed
    return {"tok_s_plain": tok_s_plain, "tok_s_inflight": tok_s_inflight,
            "inflight_ratio": tok_s_inflight / tok_s_plain, "inflight_updates": len(stalls),
            "inflight_stall_ms": statistics.median(stalls) if stalls else None,
            "inflight_stall_ms_max": max(stalls) if stalls else None,
            "inflight_update_ms": statistics.median(walls) if walls else None,
            "all_requests_complete": len(gens) == n_prompts and all(len(g.token_ids) == max_tokens for g in gens),
            "prompts": n_prompts, "max_tokens": max_tokens}


def fixed_cost(engine, tensors, schema, wire: str, device, updates: int) -> dict:
    """An update of a plan with one small tensor (the final norm): what an update costs
    whatever its size (control plane, engine round trip, the worker's dispatch)."""
    from rlloop.weights.protocol import make_plan

    small = make_plan([schema["model.norm.weight"]], partial=True)
    bench = Bench(engine, {"model.norm.weight": tensors["model.norm.weight"]}, small, device)
    out = bench.measure(wire, updates)
    bench.close()
    return {"wire": wire, "bytes": small.total_bytes, **out}


def kv_stall(bench: Bench, n_prompts: int, max_tokens: int, vocab_hi: int) -> dict:
    """`n_prompts` requests in flight, a quarter through their tokens: one batch with no
    update, one whose update keeps the KV cache, one whose update recomputes it. Per
    batch its wall time (the re-prefill of `recompute` is paid in the steps after the
    update) and the update's stall, requests in flight and tokens recomputed."""
    out = {"prompts": n_prompts}
    for kv in ("none", "keep", "recompute"):
        t0 = time.perf_counter()
        fut = generate_load(bench.engine, n_prompts, max_tokens, vocab_hi, seed=2)
        deadline = t0 + 300
        while time.perf_counter() < deadline:  # every request running, a quarter through its tokens
            s = ray.get(bench.engine.stats.remote())
            if s["in_flight"] == n_prompts and s["kv_tokens"] >= n_prompts * (16 + max_tokens // 4):
                break
            time.sleep(0.005)
        else:
            raise RuntimeError(f"kv stall: {n_prompts} requests never ran at once (max_num_seqs, KV cache size?)")
        row = {}
        if kv != "none":
            ms, st, _ = bench.push(kv=kv)
            row = {"update_ms": ms, "stall_ms": st.pause_ms, "in_flight": st.in_flight,
                   "recomputed_requests": st.recomputed_requests, "recomputed_tokens": st.recomputed_tokens}
        gens = ray.get(fut)
        out[kv] = {"batch_s": time.perf_counter() - t0, **row,
                   "complete": len(gens) == n_prompts and all(len(g.token_ids) == max_tokens for g in gens)}
    out["recompute_cost_s"] = out["recompute"]["batch_s"] - out["keep"]["batch_s"]
    print(f"kv stall: {json.dumps(out)}", flush=True)
    return out


def sleep_wake(bench: Bench, probe, greedy, want) -> dict:
    """Sleep at levels 1 and 2, wake, update: memory released, wake time, and the
    engine still decodes the reference after a level-2 sleep plus a full update."""
    out = {}
    for level in (1, 2):
        slept = ray.get(bench.engine.sleep.remote(level))
        woke = ray.get(bench.engine.wake_up.remote())
        bench.push()
        got = [g.token_ids for g in ray.get(bench.engine.generate.remote(probe, greedy))]
        out[f"level{level}"] = {**slept, **woke, "released_gib": slept["released_bytes"] / 2**30,
                                "outputs_match_after_wake": got == want}
    print(f"sleep/wake: {json.dumps(out)}", flush=True)
    return out


def native_ipc(path: str, tensors: dict, dtype: str, gpu_mem: float, updates: int) -> dict:
    """vLLM's own IPC weight-transfer engine on the same tensors (vLLM >= 0.26)."""
    from dataclasses import asdict

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

    llm = LLM(model=path, dtype=dtype, load_format="dummy", enforce_eager=True, gpu_memory_utilization=gpu_mem,
              max_model_len=512, max_num_seqs=8, weight_transfer_config={"backend": "ipc"})
    llm.init_weight_transfer_engine({"init_info": {}})
    named = [(n, t) for n, t in tensors.items()]

    def update():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.start_weight_update()
        IPCWeightTransferEngine.trainer_send_weights(
            iter(named), {"send_mode": lambda info: llm.update_weights({"update_info": asdict(info)}),
                          "packed": False})
        llm.finish_weight_update()
        return (time.perf_counter() - t0) * 1e3

    update()  # warm-up
    runs = [update() for _ in range(updates)]
    out = {"update_ms": statistics.median(runs), "update_ms_all": [round(r, 2) for r in runs]}
    print(f"vllm native ipc: {json.dumps(out)}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | qwen2.5-1.5b | qwen2.5-7b")
    ap.add_argument("--json", default=None)
    ap.add_argument("--wires", nargs="+", default=None, help="default: ipc ipc_packed gloo on one GPU, shm gloo on CPU")
    ap.add_argument("--bucket-mb", type=float, default=None, help="default: 1 on CPU, 512 on GPU")
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--update-every", type=float, default=1.0)
    ap.add_argument("--kv-prompts", type=int, default=256, help="requests in flight for the keep/recompute stall")
    ap.add_argument("--gpu-mem", type=float, default=0.3, help="engine's GPU memory fraction")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs / compile (fast start)")
    ap.add_argument("--no-native", action="store_true", help="skip vLLM's own IPC engine")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available()
    dtype = "bfloat16" if gpu else "float32"
    wires = args.wires or (["ipc", "ipc_packed", "gloo"] if gpu else ["shm", "gloo"])
    bucket_mb = args.bucket_mb or (512 if gpu else 1)
    n_prompts = args.prompts or (512 if gpu else 64)
    max_tokens = args.max_tokens or (512 if gpu else 400)
    tmp = tempfile.mkdtemp(prefix="rlloop-bench-")
    path = str(model_dir(args.model, os.path.join(tmp, "model"), dtype=dtype))

    ray.init(include_dashboard=False, log_to_driver=False)
    cfg = EngineConfig(model=path, dtype=dtype, load_format="auto" if args.model == "tiny" else "dummy",
                       gpu_memory_utilization=args.gpu_mem, max_model_len=2048 if gpu else 512,
                       max_num_seqs=512 if gpu else 64, enforce_eager=args.eager or not gpu,
                       enable_sleep_mode=gpu)
    engine = engine_actor(cfg, name="bench/engine/0", cls=FloorEngine)
    info = ray.get(engine.ready.remote())
    device = f"cuda:{info['gpus'][0]}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(0)  # the driver sees the GPU it shares with the engine
        device = "cuda:0"
    print(f"engine ready {info}; sender on {device}; wires {wires}", flush=True)

    schema = checkpoint_schema(path, DTYPES[dtype])
    from transformers import AutoConfig

    tied = bool(getattr(AutoConfig.from_pretrained(path), "tie_word_embeddings", False))
    tensors = tie(random_weights(schema, device, seed=1), tied)
    plan = make_plan(list(schema.values()), bucket_bytes=int(bucket_mb * 2**20))
    fixed = fixed_cost(engine, tensors, schema, wires[0], device, args.updates)
    bench = Bench(engine, tensors, plan, device)
    per_wire = {}
    for wire in reversed(wires):  # the first wire last: it stays formed for the checks below
        per_wire[wire] = bench.measure(wire, args.updates)

    # Correctness: greedy output after an update vs ground truth (new weights, same storage).
    greedy = Sampling(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=False)
    vocab_hi = 90 if args.model == "tiny" else 5000
    probe = [torch.randint(2, vocab_hi, (12,), generator=torch.Generator().manual_seed(i)).tolist()
             for i in range(4)]
    for name, t in tie(random_weights(schema, device, seed=7), tied).items():
        tensors[name].copy_(t)
    bench.push()
    got = [g.token_ids for g in ray.get(engine.generate.remote(probe, greedy))]
    if args.model == "tiny":
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ref_model.load_state_dict({k: v.cpu() for k, v in tensors.items()}, strict=False)
        want = [ref_model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False,
                                   eos_token_id=None, pad_token_id=1)[0, len(p):].tolist() for p in probe]
    else:
        bench.push(mode="checkpoint")  # same weights through vLLM's own loader
        want = [g.token_ids for g in ray.get(engine.generate.remote(probe, greedy))]

    result = {
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "model": args.model, "dtype": dtype, "bytes": plan.total_bytes, "buckets": len(plan.buckets),
        "wires": per_wire, "outputs_match_reference": got == want,
        "throughput_wire": wires[0],
        **throughput(bench, n_prompts, max_tokens, vocab_hi, args.update_every),
        "fixed_cost": fixed,
        "kv_stall": kv_stall(bench, min(args.kv_prompts, cfg.max_num_seqs), max_tokens, vocab_hi),
        "versions": {"vllm": __import__("vllm").__version__, "torch": torch.__version__, "ray": ray.__version__},
        "eager": cfg.enforce_eager,
    }
    floors = [w["floor_ms"] for w in per_wire.values() if "floor_ms" in w and w is not per_wire.get("gloo")]
    if floors:
        result["floor_ms"] = min(floors)
        for w in per_wire.values():
            w["x_floor"] = w["update_ms"] / result["floor_ms"]
    if gpu:
        result["sleep_wake"] = sleep_wake(bench, probe, greedy, want)
    bench.sender.close()
    ray.get(engine.shutdown.remote())
    ray.kill(engine)
    if gpu and not args.no_native:
        try:
            result["vllm_native_ipc"] = native_ipc(path, tensors, dtype, args.gpu_mem, args.updates)
            result["native_over_ipc"] = result["vllm_native_ipc"]["update_ms"] / per_wire[wires[0]]["update_ms"]
        except Exception as e:  # record why, keep the rest of the run
            result["vllm_native_ipc"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    ray.shutdown()
    ok = result["all_requests_complete"] and result["outputs_match_reference"]
    if gpu:  # vLLM's engine-core child of the native phase holds our pipes: end it, skip teardown
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.kill()
        os._exit(0 if ok else 1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

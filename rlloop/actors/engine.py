"""GenerationEngine: a Ray actor hosting one vLLM AsyncLLM (which may itself use TP > 1)
whose weights are replaced in flight.

An update never stops a request: the scheduler is paused with mode="keep" (requests
stay where they are, KV cache kept), the new weights are received and loaded by every
worker, and the scheduler resumes. Requests simply continue on the new version.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rlloop.actors.weight_sync import placement
from rlloop.metrics import report
from rlloop.weights.group import WeightGroupConfig
from rlloop.weights.protocol import (UpdatePlan, UpdateTicket, WeightUpdateError, WeightUpdateRequest,
                                    check_version, pack, resolve, validate_request)


@dataclass(frozen=True)
class EngineConfig:
    model: str  # local HF directory (config + tokenizer; weights unless load_format="dummy")
    dtype: str = "float32"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.15  # on GPU; on CPU the KV cache is sized by cpu_kv_cache_bytes
    max_model_len: int = 512
    max_num_seqs: int = 64
    seed: int = 0
    load_format: str = "auto"
    enforce_eager: bool = True
    receive_mode: str = "auto"  # see rlloop.weights.receiver
    enable_sleep_mode: bool = False  # GPU only: sleep() / wake_up() free and retake the engine's memory


@dataclass
class Sampling:
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = False
    logprobs: bool = True
    seed: int | None = None


@dataclass
class Generation:
    prompt: str | list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]  # of each sampled token under the weights that sampled it
    finish_reason: str | None
    version_start: int  # weight version when the request was admitted
    version_end: int  # weight version when it finished


@dataclass
class UpdateStats:
    version: int
    mode: str
    bytes: int
    pause_ms: float  # generation stall: pause .. resume
    receive_ms: float  # receive + load on the workers (slowest worker)
    total_ms: float
    gbps: float


@dataclass
class EngineStats:
    version: int = 0
    updates: int = 0
    rejected_updates: int = 0
    requests_done: int = 0
    tokens_generated: int = 0
    in_flight: int = 0
    last_update: dict = field(default_factory=dict)


class EngineStartError(RuntimeError):
    """vLLM's engine core failed to start; the message carries the core's own error."""


class GenerationEngine:
    """Use as `ray.remote(GenerationEngine)` (see `engine_actor`); methods are async."""

    def __init__(self, config: EngineConfig):
        import torch
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from rlloop.models.schema import checkpoint_schema
        from rlloop.weights.protocol import DTYPES

        self.config = config
        args = AsyncEngineArgs(
            model=config.model, dtype=config.dtype, tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization, max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs, seed=config.seed, load_format=config.load_format,
            enforce_eager=config.enforce_eager, enable_prefix_caching=False,
            enable_sleep_mode=config.enable_sleep_mode,
            kv_cache_memory_bytes=None if torch.cuda.is_available() else cpu_kv_cache_bytes(config),
            worker_extension_cls="rlloop.weights.receiver.WeightReceiver",
        )
        logs = _OwnLogs()
        try:
            self.llm = AsyncLLM.from_engine_args(args)
        except Exception as e:
            # The root cause is raised in the engine-core process, which only logs it
            # (to this actor's log files, which a Ray driver does not show): carry it.
            raise EngineStartError(f"vLLM engine for {config.model} failed to start: {e}\n"
                                   f"{logs.tail()}") from e
        self.schema = checkpoint_schema(config.model, DTYPES[config.dtype])
        self.stats_ = EngineStats()
        self._update_lock = asyncio.Lock()
        self._plans: dict[str, UpdatePlan] = {}  # plans validated here, by key
        self._prepared: dict[tuple[str, str], str] = {}  # (plan key, mode) -> the workers' receive mode

    async def ready(self) -> dict:
        import ray

        return {"pid": os.getpid(), "model": self.config.model, "version": self.stats_.version,
                **placement()}

    # --- generation -------------------------------------------------------------------

    def _params(self, s: Sampling):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                              ignore_eos=s.ignore_eos, logprobs=0 if s.logprobs else None,
                              seed=s.seed)

    async def _run(self, prompt, sampling: Sampling):
        params = self._params(sampling)
        engine_prompt = {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt
        start = self.stats_.version
        self.stats_.in_flight += 1
        report(in_flight=self.stats_.in_flight)
        try:
            async for out in self.llm.generate(engine_prompt, params, request_id=uuid.uuid4().hex):
                yield out, start
        finally:
            self.stats_.in_flight -= 1
            report(in_flight=self.stats_.in_flight)

    def _generation(self, prompt, out, start: int) -> Generation:
        c = out.outputs[0]
        lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)] if c.logprobs else []
        return Generation(prompt, list(c.token_ids), c.text, lps, c.finish_reason,
                          start, self.stats_.version)

    async def generate_one(self, prompt: str | list[int], sampling: Sampling) -> Generation:
        final = None
        async for out, start in self._run(prompt, sampling):
            final = (out, start)
        gen = self._generation(prompt, *final)
        self.stats_.requests_done += 1
        self.stats_.tokens_generated += len(gen.token_ids)
        return gen

    async def generate(self, prompts: list, sampling: Sampling | None = None,
                       seeds: list[int] | None = None) -> list[Generation]:
        """`seeds`: one sampling seed per prompt (overrides `sampling.seed`), so that a
        request issued again samples the same tokens from the same weights."""
        sampling = sampling or Sampling()
        per_prompt = ([replace(sampling, seed=s) for s in seeds] if seeds is not None
                      else [sampling] * len(prompts))
        return list(await asyncio.gather(*(self.generate_one(p, s) for p, s in zip(prompts, per_prompt))))

    async def generate_stream(self, prompt: str | list[int], sampling: Sampling | None = None):
        """Yields (new token ids, weight version) as tokens arrive, then the Generation."""
        sampling = sampling or Sampling()
        seen = 0
        last = None
        async for out, start in self._run(prompt, sampling):
            ids = out.outputs[0].token_ids
            if len(ids) > seen:
                # Count what is yielded, not len(ids) after the yield: vLLM may append to
                # the same list while this generator is suspended.
                new = list(ids[seen:])
                seen += len(new)
                yield new, self.stats_.version
            last = (out, start)
        self.stats_.requests_done += 1
        self.stats_.tokens_generated += seen
        yield self._generation(prompt, *last)

    # --- weights ----------------------------------------------------------------------

    async def init_weight_group(self, cfg: WeightGroupConfig, rank_offset: int) -> list[int]:
        """Join the weight group: worker w of this engine becomes rank rank_offset + w."""
        self._plans.clear()
        self._prepared.clear()
        return await self.llm.collective_rpc("rl_join_weight_group", args=(pack(cfg), rank_offset))

    async def leave_weight_group(self) -> None:
        await self.llm.collective_rpc("rl_leave_weight_group")
        self._plans.clear()
        self._prepared.clear()

    def _admit(self, update: WeightUpdateRequest | UpdateTicket, mode: str) -> WeightUpdateRequest:
        """The request `update` stands for, checked against this model: a request in full
        is validated whole; a ticket names a plan validated here before, so only its
        version is new. Raises WeightUpdateError and changes nothing."""
        try:
            request = resolve(update, self._plans)
            if update is request or (request.plan.key, mode) not in self._prepared:
                validate_request(request, self.schema, self.stats_.version)
            else:
                check_version(request.version, self.stats_.version)
        except WeightUpdateError:
            self.stats_.rejected_updates += 1
            raise
        return request

    async def prepare_update(self, request: WeightUpdateRequest, mode: str | None = None) -> str:
        """Validate, then let every worker build its buffers for this plan (once per
        plan, outside any pause); later updates of the plan may then come as tickets.
        Returns the receive mode the workers chose. `mode` overrides the configured
        receive mode for this plan."""
        mode = mode or self.config.receive_mode
        self._admit(request, mode)
        key = (request.plan.key, mode)
        if key not in self._prepared:  # workers keep per-plan state: one RPC per plan
            modes = await self.llm.collective_rpc("rl_prepare", args=(pack(request), mode))
            self._plans[request.plan.key] = request.plan
            self._prepared[key] = modes[0]
        return self._prepared[key]

    async def update_weights(self, update: WeightUpdateRequest | UpdateTicket,
                             mode: str | None = None) -> UpdateStats:
        """Receive `update` from the sender and load it, pausing generation only for the
        transfer. A request that does not fit is rejected before anything changes; on a
        broadcast wire call `prepare_update` first, so that it is rejected before the
        sender starts (UpdatePusher does)."""
        mode = mode or self.config.receive_mode
        async with self._update_lock:
            request = self._admit(update, mode)
            if (request.plan.key, mode) not in self._prepared:
                await self.prepare_update(request, mode)
            t0 = time.perf_counter()
            # What AsyncLLM.pause_generation(mode="keep", clear_cache=False) does, minus
            # the fixed 20 ms sleep it ends with (vLLM 0.26 and 0.32), which its own
            # comment says correctness does not need: with "keep" no request finishes
            # here, so the stall is the transfer, not a timer.
            await self.llm.engine_core.pause_scheduler_async(mode="keep", clear_cache=False)
            t1 = time.perf_counter()
            try:
                # The workers hold the plan: only its key and the version cross.
                results = await self.llm.collective_rpc("rl_receive", args=(request.plan.key, request.version, mode))
                self.stats_.version = request.version
            finally:
                await self.llm.resume_generation()
            t2 = time.perf_counter()
            nbytes = request.plan.total_bytes
            receive_ms = max(r["worker_ms"] for r in results)
            stats = UpdateStats(
                version=request.version, mode=results[0]["mode"], bytes=nbytes,
                pause_ms=(t2 - t1) * 1e3, receive_ms=receive_ms, total_ms=(t2 - t0) * 1e3,
                gbps=nbytes / (receive_ms * 1e-3) / 1e9 if receive_ms > 0 else 0.0)
            self.stats_.updates += 1
            self.stats_.last_update = asdict(stats)
            report(weight_version=stats.version, update_ms=stats.total_ms, stall_ms=stats.pause_ms,
                   transfer_gbps=stats.gbps, in_flight=self.stats_.in_flight)
            return stats

    async def receive_raw(self, request: WeightUpdateRequest) -> dict:
        """Receive the plan's bytes without loading them (benchmark floor); no pause.
        The plan must have been prepared (an update of it ran)."""
        results = await self.llm.collective_rpc(
            "rl_receive", args=(request.plan.key, request.version, self.config.receive_mode), kwargs={"load": False})
        return results[0]

    async def sleep(self, level: int = 1) -> dict:
        """Release the engine's GPU memory while the learner trains (vLLM sleep mode;
        needs enable_sleep_mode): level 1 moves the weights to host memory and drops the
        KV cache, level 2 drops both (the next full weight update rewrites every
        parameter). Refused while requests are in flight: vLLM would abort them."""
        if self.stats_.in_flight:
            raise RuntimeError(f"engine sleep refused: {self.stats_.in_flight} requests in flight would be aborted")
        before = await self._free_device_bytes()
        t0 = time.perf_counter()
        await self.llm.sleep(level)
        sleep_ms = (time.perf_counter() - t0) * 1e3
        return {"sleep_ms": sleep_ms, "released_bytes": await self._free_device_bytes() - before}

    async def wake_up(self) -> dict:
        before = await self._free_device_bytes()
        t0 = time.perf_counter()
        await self.llm.wake_up()
        wake_ms = (time.perf_counter() - t0) * 1e3
        return {"wake_ms": wake_ms, "retaken_bytes": before - await self._free_device_bytes()}

    async def _free_device_bytes(self) -> int:
        return min(await self.llm.collective_rpc("rl_free_device_bytes"))

    def version(self) -> int:
        return self.stats_.version

    def stats(self) -> dict:
        return {**asdict(self.stats_), "rss_mb": _tree_rss_mb()}

    async def shutdown(self) -> None:
        self.llm.shutdown()


def cpu_kv_cache_bytes(config: EngineConfig) -> int:
    """KV cache for max_num_seqs sequences of max_model_len tokens of this model.

    On CPU, vLLM reads gpu_memory_utilization as a fraction of the NUMA node's RAM and
    gives the KV cache that fraction minus the engine's own resident memory (~0.7 GiB
    for the tiny model): a budget that goes negative ("Engine core initialization
    failed") on a node with less RAM, or when other engines and learners share it.
    An explicit size depends only on the model and the limits asked for."""
    from rlloop.weights.protocol import DTYPES

    hf = json.loads((Path(config.model) / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    per_token = 2 * hf["num_hidden_layers"] * kv_heads * head_dim * DTYPES[config.dtype].itemsize
    return config.max_num_seqs * config.max_model_len * per_token


class _OwnLogs:
    """This process's stdout and stderr from now on, where they are files (a Ray
    worker's are; vLLM's engine-core and worker processes inherit them and log there)."""

    TAIL = 20
    _ANSI = re.compile(r"\x1b\[[0-9;]*m")
    # "(EngineCore pid=12) ERROR 11-25 08:24:13 [core.py:1510] " before a subprocess's line
    _PREFIX = re.compile(r"^\(\w+ pid=\d+\) (?:[A-Z]+ [\d-]+ [\d:]+ \[[^\]]+\] )?")
    _EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception): \S")

    def __init__(self):
        self.start = {}
        for fd in (1, 2):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if os.path.isfile(path):
                self.start[path] = os.path.getsize(path)

    def tail(self) -> str:
        """The exception lines the subprocesses logged (the root cause is among them),
        then the last lines of each file."""
        errors, tails = [], []
        for path, offset in self.start.items():
            with open(path, errors="replace") as f:
                f.seek(offset)
                lines = self._ANSI.sub("", f.read()).splitlines()
            for line in lines:
                bare = self._PREFIX.sub("", line)
                if self._EXCEPTION.match(bare) and bare not in errors:
                    errors.append(bare)
            if lines:
                tails.append(f"[last lines of {path}]\n" + "\n".join(lines[-self.TAIL:]))
        if not tails:
            return "(not captured: this process's output is not a file; see above)"
        return "\n".join(["[exceptions raised]", *errors, *tails])


def _tree_rss_mb() -> float:
    """Resident memory of this actor and the vLLM processes it spawned."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def engine_actor(config: EngineConfig, name: str | None = None, num_gpus: float | None = None,
                 max_restarts: int = 0):
    """Start a GenerationEngine Ray actor. On GPU it reserves tensor_parallel_size GPUs.
    With max_restarts, Ray restarts a dead engine (on its initial weights, outside the
    weight group): whoever drives it must re-form the group and resend (Coordinator)."""
    import ray
    import torch

    if num_gpus is None:
        num_gpus = config.tensor_parallel_size if torch.cuda.is_available() else 0
    opts = dict(num_cpus=0, num_gpus=num_gpus, max_concurrency=1000, max_restarts=max_restarts,
                runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}})
    if name:
        opts["name"] = name
    return ray.remote(GenerationEngine).options(**opts).remote(config)

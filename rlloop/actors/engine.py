"""GenerationEngine: a Ray actor hosting one vLLM AsyncLLM (which may itself use TP > 1)
whose weights are replaced in flight.

An update never stops a request: the scheduler is paused with mode="keep" (requests
stay where they are, KV cache kept), the new weights are received and loaded by every
worker, and the scheduler resumes. Requests simply continue on the new version.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import asdict, replace

from rlloop.actors.engine_io import (KV_AFTER_UPDATE, EngineConfig, EngineCounters, Generation, Sampling,
                                     UpdateStats)
from rlloop.actors.kv_gap import KvGapMeter
from rlloop.actors.vllm_process import OwnLogs, cpu_kv_cache_bytes, tree_rss_mb
from rlloop.actors.weight_sync import placement
from rlloop.metrics import report
from rlloop.weights.group import WeightGroupConfig
from rlloop.weights.protocol import (UpdatePlan, UpdateTicket, WeightUpdateError, WeightUpdateRequest,
                                    check_version, load_groups, pack, resolve,
                                    validate_request)
from rlloop.weights.shared import SHARED_WIRES


class EngineStartError(RuntimeError):
    """vLLM's engine core failed to start; the message carries the core's own error."""


class EngineSwapping(RuntimeError):
    """A request refused because the engine is replacing its model (requests_during_swap=refuse)."""


class GenerationEngine:
    """Use as `ray.remote(GenerationEngine)` (see `engine_actor`); methods are async."""

    def __init__(self, config: EngineConfig):
        self.counters = EngineCounters()
        self._update_lock = asyncio.Lock()
        self._serving = asyncio.Event()  # cleared while the base model is being swapped
        self._serving.set()
        self._refuse_during_swap, self._swapping_to = False, None
        self._held = False  # paused through pause() (the control plane) until resume()
        self._server = None  # (uvicorn server, its task): serve_openai
        self._tokens: dict[str, tuple[int, int]] = {}  # request id in flight -> (prompt, generated) tokens
        self._start_version: dict[str, int] = {}  # request id in flight -> weight version it was admitted under
        self.kv_gap = KvGapMeter(config.kv_gap_requests, self._logprobs_now, lambda: self.counters.version)
        self._start(config)

    def _start(self, config: EngineConfig) -> None:
        """Start vLLM on `config.model`; what the engine derived from an earlier model
        (its schema, plans, weight group) starts over."""
        import torch
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from rlloop.models.schema import checkpoint_schema
        from rlloop.weights.protocol import DTYPES

        self.config = config
        on_cpu = not torch.cuda.is_available()
        if on_cpu and config.tensor_parallel_size == 1:
            # vLLM's CPU platform puts its one worker in a process of its own (a second
            # spawn after the engine core's, ~12 s of imports on an idle core, three
            # times that on a loaded one) unless V1 multiprocessing is off; AsyncLLM
            # still runs the core in its own process, which then holds the worker, as
            # a TP=1 engine on a GPU does.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        elif on_cpu:
            # vLLM binds each CPU worker's threads to a NUMA node of its own and refuses
            # TP > 1 on a host with fewer nodes (most machines: one); share the cores.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        args = AsyncEngineArgs(
            model=config.model, dtype=config.dtype, tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization, max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs, seed=config.seed, load_format=config.load_format,
            enforce_eager=config.enforce_eager, enable_prefix_caching=False,
            enable_sleep_mode=config.enable_sleep_mode,
            distributed_executor_backend="uni" if on_cpu and config.tensor_parallel_size == 1 else None,
            # A prefill split over steps rewinds the request's sampling generator, which a
            # CPU generator cannot do ("CPU Generator does not use offset": the core dies):
            # on CPU every prompt is prefilled whole (second turns of 256 episodes at once do).
            enable_chunked_prefill=False if on_cpu else None,
            kv_cache_memory_bytes=cpu_kv_cache_bytes(config) if on_cpu else None,
            worker_extension_cls="rlloop.weights.receiver.WeightReceiver",
        )
        logs = OwnLogs()
        try:
            self.llm = AsyncLLM.from_engine_args(args)
        except Exception as e:
            # The root cause is raised in the engine-core process, which only logs it
            # (to this actor's log files, which a Ray driver does not show): carry it.
            raise EngineStartError(f"vLLM engine for {config.model} failed to start: {e}\n"
                                   f"{logs.tail()}") from e
        self.schema = checkpoint_schema(config.model, DTYPES[config.dtype])
        self._shared_wire = False
        self._groups: dict[str, frozenset[str]] | None = None  # what loads together (partial plans)
        self._plans: dict[str, UpdatePlan] = {}  # plans validated here, by key
        # (plan key, mode, TP size of its senders: 1, or sharded) -> the workers' receive mode
        self._prepared: dict[tuple[str, str, int], str] = {}
        self._episode_tokenizer = None  # _tokenizer(): loaded by the first episode on this model

    async def ready(self) -> dict:
        return {"pid": os.getpid(), "model": self.config.model, "version": self.counters.version,
                **placement()}

    # --- generation -------------------------------------------------------------------

    def _params(self, s: Sampling):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                              ignore_eos=s.ignore_eos, logprobs=0 if s.logprobs else None,
                              seed=s.seed, stop=list(s.stop) or None, include_stop_str_in_output=bool(s.stop))

    async def _run(self, prompt, sampling: Sampling):
        engine_prompt = {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt
        request_id = uuid.uuid4().hex
        async for out in self.tracked_generate(engine_prompt, self._params(sampling), request_id):
            yield out, self._start_version[request_id]

    async def tracked_generate(self, prompt, params, request_id: str, *args, **kwargs):
        """AsyncLLM.generate as every request of this engine runs it, from Ray or from its
        OpenAI routes: it waits out (or is refused during) a swap, counts in flight and
        done, keeps its KV tokens (kv_after_update=recompute) and may be re-scored
        (kv_gap)."""
        if not self._serving.is_set():  # a request that arrives during a swap
            if self._refuse_during_swap:
                raise EngineSwapping(f"engine is swapping its model to {self._swapping_to}: request refused "
                                     "(engines.requests_during_swap=refuse)")
            await self._serving.wait()  # ... runs on the new model
        self._start_version[request_id] = self.counters.version
        self.counters.in_flight += 1
        report(in_flight=self.counters.in_flight)
        try:
            async for out in self.llm.generate(prompt, params, request_id, *args, **kwargs):
                # tokens that hold KV cache now: what kv_after_update="recompute" prefills again
                self._tokens[request_id] = (len(out.prompt_token_ids or ()), len(out.outputs[0].token_ids))
                yield out
            self.counters.requests_done += 1
            self.counters.tokens_generated += sum(len(c.token_ids) for c in out.outputs)
            self.kv_gap.finished(request_id, out.prompt_token_ids, list(out.outputs[0].token_ids),
                                 _token_logprobs(out.outputs[0]), self.counters.version)
        finally:
            self._tokens.pop(request_id, None)
            self._start_version.pop(request_id, None)
            self.counters.in_flight -= 1
            report(in_flight=self.counters.in_flight)

    def _generation(self, prompt, out, start: int) -> Generation:
        c = out.outputs[0]
        return Generation(prompt, list(c.token_ids), c.text, _token_logprobs(c), c.finish_reason,
                          start, self.counters.version)

    async def _logprobs_now(self, token_ids: list[int]) -> list[float]:
        """The loaded weights' log-prob of each token after the first (one prefill)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        async for out in self.llm.generate({"prompt_token_ids": token_ids}, params, request_id=uuid.uuid4().hex):
            pass
        return [d[t].logprob for t, d in zip(token_ids[1:], out.prompt_logprobs[1:])]

    async def generate_one(self, prompt: str | list[int], sampling: Sampling) -> Generation:
        final = None
        async for out, start in self._run(prompt, sampling):
            final = (out, start)
        return self._generation(prompt, *final)

    async def generate(self, prompts: list, sampling: Sampling | None = None,
                       seeds: list[int] | None = None) -> list[Generation]:
        """`seeds`: one sampling seed per prompt (overrides `sampling.seed`), so that a
        request issued again samples the same tokens from the same weights."""
        sampling = sampling or Sampling()
        per_prompt = ([replace(sampling, seed=s) for s in seeds] if seeds is not None
                      else [sampling] * len(prompts))
        return list(await asyncio.gather(*(self.generate_one(p, s) for p, s in zip(prompts, per_prompt))))

    async def episodes(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int], agent: str,
                       max_turns: int, problems: list | None = None) -> list[Generation]:
        """Multi-turn rollouts: `agent` (module:function, rlloop.agents) runs once per
        prompt (and its problem) against a token-in/token-out client of this engine;
        each episode comes back as one Generation whose loss_mask marks the tokens the
        model sampled."""
        from rlloop.agents.episode import TurnClient, run_agent

        client = TurnClient(self, self._tokenizer())
        problems = problems or [None] * len(prompts)
        return list(await asyncio.gather(*(run_agent(agent, client, p, replace(sampling, seed=s), max_turns, q)
                                           for p, s, q in zip(prompts, seeds, problems))))

    def _tokenizer(self):
        """The model's tokenizer, for the environment text of episodes (loaded once)."""
        if self._episode_tokenizer is None:
            from transformers import AutoTokenizer

            self._episode_tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        return self._episode_tokenizer

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
                yield new, self.counters.version
            last = (out, start)
        yield self._generation(prompt, *last)

    # --- weights ----------------------------------------------------------------------

    async def init_weight_group(self, cfg: WeightGroupConfig, rank_offset: int, replica: int = 0) -> list[int]:
        """Join the weight group: worker w of this engine becomes rank rank_offset + w,
        and takes its weights from learner DP replica `replica` (cfg.replicas)."""
        self._plans.clear()
        self._prepared.clear()
        self._shared_wire = cfg.backend in SHARED_WIRES
        return await self.llm.collective_rpc("rl_join_weight_group", args=(pack(cfg), rank_offset, replica))

    async def leave_weight_group(self) -> None:
        await self.llm.collective_rpc("rl_leave_weight_group")
        self._plans.clear()
        self._prepared.clear()

    async def _admit(self, update: WeightUpdateRequest | UpdateTicket, mode: str) -> WeightUpdateRequest:
        """The request `update` stands for, checked against this model: a request in full
        is validated whole; a ticket names a plan validated here before, so only its
        version is new. Raises WeightUpdateError and changes nothing."""
        if self._groups is None and isinstance(update, WeightUpdateRequest) and update.plan.partial:
            packed = (await self.llm.collective_rpc("rl_packed_modules"))[0]
            tied = bool(getattr(self.llm.model_config.hf_config, "tie_word_embeddings", False))
            self._groups = load_groups(self.schema, packed, tied)
        try:
            request = resolve(update, self._plans)
            if update is request or _prepared_key(request, mode) not in self._prepared:
                validate_request(request, self.schema, self.counters.version, self._groups,
                                 self.config.tensor_parallel_size)
            else:
                check_version(request.version, self.counters.version)
        except WeightUpdateError:
            self.counters.rejected_updates += 1
            raise
        return request

    async def prepare_update(self, request: WeightUpdateRequest, mode: str | None = None) -> str:
        """Validate, then let every worker build its buffers for this plan (once per
        plan, outside any pause); later updates of the plan may then come as tickets.
        Returns the receive mode the workers chose. `mode` overrides the configured
        receive mode for this plan."""
        mode = mode or self.config.receive_mode
        await self._admit(request, mode)
        key = _prepared_key(request, mode)
        if key not in self._prepared:  # workers keep per-plan state: one RPC per plan
            modes = await self.llm.collective_rpc("rl_prepare", args=(pack(request), mode))
            if self._shared_wire:  # the workers hold one plan's region (the sender's), as here
                self._prepared = {k: v for k, v in self._prepared.items() if k[0] == request.plan.key}
            self._plans[request.plan.key] = request.plan
            self._prepared[key] = modes[0]
        return self._prepared[key]

    async def update_weights(self, update: WeightUpdateRequest | UpdateTicket,
                             mode: str | None = None, kv: str | None = None) -> UpdateStats:
        """Receive `update` from the sender and load it, pausing generation only for the
        transfer. A request that does not fit is rejected before anything changes; on a
        broadcast wire call `prepare_update` first, so that it is rejected before the
        sender starts (UpdatePusher does). `kv` overrides kv_after_update: with
        "recompute", the requests in flight drop the KV cache the old weights computed
        (vLLM preempts them) and prefill prompt + tokens so far on the new ones."""
        mode = mode or self.config.receive_mode
        kv = kv or self.config.kv_after_update
        if kv not in KV_AFTER_UPDATE:
            raise ValueError(f"kv_after_update must be one of {KV_AFTER_UPDATE}, got {kv!r}")
        async with self._update_lock:
            request = await self._admit(update, mode)
            if _prepared_key(request, mode) not in self._prepared:
                await self.prepare_update(request, mode)
            t0 = time.perf_counter()
            recompute = kv == "recompute"
            if recompute:
                # What AsyncLLM.pause_generation(mode="keep", clear_cache=False) does, minus
                # the fixed 20 ms sleep it ends with (vLLM 0.26 and 0.32), which its own
                # comment says correctness does not need.
                await self.llm.engine_core.pause_scheduler_async(mode="keep", clear_cache=False)
            # With kv="keep" nothing pauses: the engine core runs a utility call between
            # two engine steps (EngineCore._process_input_queue), so the copy lands after
            # the step before it and before the next, and the stall is the workers' copy
            # alone, not three round trips to the core (pause, receive, resume). A step
            # already on the device (async scheduling) is ordered before the copy by its
            # stream. The workers hold the plan: only its key and the version cross.
            t1 = time.perf_counter()
            try:
                results = await self.llm.collective_rpc("rl_receive", args=(request.plan.key, request.version, mode),
                                                        kwargs={"tp_size": request.tp_size})
                self.counters.version = request.version
                landed_in = len(self._tokens)
                gap = self.kv_gap.update_landed(request.version, {r: g for r, (_, g) in self._tokens.items()})
                recomputed = {r: p + g for r, (p, g) in self._tokens.items()} if recompute else {}
                if recomputed:  # running requests go back to the waiting queue, KV freed
                    await self.llm.reset_prefix_cache(reset_running_requests=True)
            finally:
                if recompute and not self._held:  # a pause asked for stays until resume()
                    await self.llm.resume_generation()
            t2 = time.perf_counter()
            nbytes = request.plan.total_bytes
            receive_ms = max(r["worker_ms"] for r in results)
            stall_ms = (t2 - t1) * 1e3 if recompute else receive_ms
            stats = UpdateStats(
                version=request.version, mode=results[0]["mode"], bytes=nbytes,
                pause_ms=stall_ms, receive_ms=receive_ms, total_ms=(t2 - t0) * 1e3,
                gbps=nbytes / (receive_ms * 1e-3) / 1e9 if receive_ms > 0 else 0.0, in_flight=landed_in, kv=kv,
                recomputed_requests=len(recomputed), recomputed_tokens=sum(recomputed.values()),
                kv_gap_tokens=gap["tokens"], kv_gap_mean=gap["mean"], kv_gap_max=gap["max"])
            self.counters.updates += 1
            self.counters.last_update = asdict(stats)
            report(weight_version=stats.version, update_ms=stats.total_ms, stall_ms=stats.pause_ms,
                   transfer_gbps=stats.gbps, in_flight=self.counters.in_flight)
            return stats

    async def pause(self) -> dict:
        """Hold the scheduler (requests stay, KV kept) until resume(); updates still land."""
        async with self._update_lock:
            await self.llm.engine_core.pause_scheduler_async(mode="keep", clear_cache=False)
            self._held = True
        return {"paused": True, "in_flight": self.counters.in_flight}

    async def resume(self) -> dict:
        async with self._update_lock:
            self._held = False
            await self.llm.resume_generation()
        return {"paused": False, "in_flight": self.counters.in_flight}

    # --- network face -----------------------------------------------------------------

    async def serve_openai(self, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                           served_name: str | None = None) -> str:
        """vLLM's OpenAI-compatible server over this engine, on this actor's event loop
        (rlloop.serving.openai_app); returns its base URL. Port 0 picks a free one."""
        from rlloop.serving.openai_app import openai_app, start_server

        if self._server is not None:
            raise RuntimeError("this engine already serves OpenAI routes")
        app = await openai_app(_Tracked(self), self.config.model, served_name or self.config.model, api_key,
                               lambda: self.counters.version)
        server, task, bound = await start_server(app, host, port)
        self._server = (server, task, dict(host=host, port=bound, api_key=api_key, served_name=served_name))
        return self.openai_url()

    def openai_url(self) -> str | None:
        if self._server is None:
            return None
        import ray

        opts = self._server[2]
        host = ray.util.get_node_ip_address() if opts["host"] == "0.0.0.0" else opts["host"]  # reachable from others
        return f"http://{host}:{opts['port']}"

    async def stop_openai(self) -> None:
        if self._server is not None:
            server, task, _ = self._server
            server.should_exit = True
            await task
            self._server = None

    async def sleep(self, level: int = 1) -> dict:
        """Release the engine's GPU memory while the learner trains (vLLM sleep mode;
        needs enable_sleep_mode): level 1 moves the weights to host memory and drops the
        KV cache, level 2 drops both (the next full weight update rewrites every
        parameter). Refused while requests are in flight: vLLM would abort them."""
        if self.counters.in_flight:
            raise RuntimeError(f"engine sleep refused: {self.counters.in_flight} requests in flight would be aborted")
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
        return self.counters.version

    def stats(self) -> dict:
        return {**asdict(self.counters), "rss_mb": tree_rss_mb(),
                "kv_tokens": sum(p + g for p, g in self._tokens.values()),  # of the requests in flight
                "kv_gap": self.kv_gap.measured()}  # since the last update (see rlloop.actors.kv_gap)

    async def swap_model(self, path: str, requests: str | None = None) -> dict:
        """Replace the base model (any architecture vLLM serves) in this actor: requests
        in flight finish first, requests that arrive meanwhile wait and then run on the
        new model; vLLM's engine core (its process and memory) is shut down before the
        new one starts. The engine leaves its weight group: whoever sends it weights
        forms a new one for the new plan. The weight version keeps rising from where it
        was. `requests` overrides engines.requests_during_swap: "refuse" answers requests
        that arrive mid-swap with EngineSwapping at once. Returns the load time and the
        memory (process tree RSS; free GPU memory) before, after the release and after
        the load."""
        import gc

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"swap_model: no config.json in {path!r} (pass a local HF directory)")
        requests = requests or self.config.requests_during_swap
        if requests not in ("wait", "refuse"):
            raise ValueError(f"requests during a swap: wait or refuse, got {requests!r}")
        async with self._update_lock:  # no weight update lands across a swap
            self._refuse_during_swap, self._swapping_to = requests == "refuse", path
            self._serving.clear()
            try:
                while self.counters.in_flight:
                    await asyncio.sleep(0.01)
                await self.kv_gap.settle()
                memory = {"before": await self._memory()}
                serving = dict(self._server[2]) if self._server else None  # the routes come back on the new model
                if serving and serving["served_name"] in (None, self.config.model):
                    serving["served_name"] = path  # named after its model: now the new one
                await self.stop_openai()
                await self.leave_weight_group()
                t0 = time.perf_counter()
                self.llm.shutdown()
                del self.llm
                gc.collect()
                memory["released"] = await self._memory()
                t1 = time.perf_counter()
                self._start(replace(self.config, model=path))
                load_ms = (time.perf_counter() - t1) * 1e3
                if serving:
                    await self.serve_openai(**serving)
                memory["after"] = await self._memory()
            finally:
                self._serving.set()
        self.counters.swaps += 1
        self.counters.last_swap = {"model": path, "release_ms": (t1 - t0) * 1e3, "load_ms": load_ms,
                                   "memory": memory}
        return self.counters.last_swap

    async def _memory(self) -> dict:
        """Process-tree RSS (MB) and, on GPU, the device's free memory (bytes) from NVML:
        this actor opens no CUDA context of its own (it would hold memory itself)."""
        import torch

        out = {"rss_mb": tree_rss_mb()}
        if torch.cuda.is_available():
            from vllm.third_party import pynvml  # vendored by vLLM

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            handle = (pynvml.nvmlDeviceGetHandleByUUID(visible) if visible.startswith("GPU-")
                      else pynvml.nvmlDeviceGetHandleByIndex(int(visible)))
            out["gpu_free_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(handle).free
        return out

    async def shutdown(self) -> None:
        await self.stop_openai()
        self.llm.shutdown()


class _Tracked:
    """The AsyncLLM as vLLM's OpenAI layer sees it: its requests run through
    tracked_generate, so they count, wait out swaps and keep their KV tokens like any."""

    def __init__(self, engine: GenerationEngine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine.llm, name)

    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        return self._engine.tracked_generate(prompt, sampling_params, request_id, *args, **kwargs)


def _prepared_key(request: WeightUpdateRequest, mode: str) -> tuple[str, str, int]:
    return request.plan.key, mode, request.tp_size


def _token_logprobs(completion) -> list[float]:
    """The log-prob of each sampled token (vLLM reports a dict per position)."""
    if not completion.logprobs:
        return []
    return [d[t].logprob for t, d in zip(completion.token_ids, completion.logprobs)]


def engine_gpus(config: EngineConfig, num_gpus: float | None) -> float:
    """GPUs an engine reserves: `num_gpus`, or by default its tensor_parallel_size on a
    GPU machine and none on CPU."""
    import torch

    if num_gpus is not None:
        return num_gpus
    return config.tensor_parallel_size if torch.cuda.is_available() else 0


def engine_actor(config: EngineConfig, name: str | None = None, num_gpus: float | None = None,
                 max_restarts: int = 0, cls: type = GenerationEngine, node_resource: str | None = None,
                 bundle=None):
    """Start a GenerationEngine (or a subclass, `cls`) Ray actor; on GPU it reserves
    tensor_parallel_size GPUs.
    With max_restarts, Ray restarts a dead engine (on its initial weights, outside the
    weight group): whoever drives it must re-form the group and resend (Fleet). Engines
    spread over the nodes (those with `node_resource`, if given), or go into `bundle` (a
    placement group's scheduling strategy: a colocated learner rank's GPU)."""
    import ray

    from rlloop.actors.placement import engine_options

    num_gpus = engine_gpus(config, num_gpus)

    opts = dict(num_cpus=0, num_gpus=num_gpus, max_concurrency=1000, max_restarts=max_restarts,
                runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}},
                **(engine_options(node_resource) if bundle is None else {"scheduling_strategy": bundle}))
    if name:
        opts["name"] = name
    return ray.remote(cls).options(**opts).remote(config)

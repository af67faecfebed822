"""What goes in and out of a GenerationEngine: its config, a request's sampling, the
generation it answers with, and the numbers of an update."""
from __future__ import annotations

from dataclasses import dataclass, field

from rlloop.defaults import default


KV_AFTER_UPDATE = ("keep", "recompute")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # local HF directory (config + tokenizer; weights unless load_format="dummy")
    dtype: str = default("model.dtype")
    tensor_parallel_size: int = default("engines.tensor_parallel_size")
    # on GPU; on CPU the KV cache is sized by cpu_kv_cache_bytes
    gpu_memory_utilization: float = default("engines.gpu_memory_utilization")
    max_model_len: int = default("engines.max_model_len")
    max_num_seqs: int = default("engines.max_num_seqs")
    seed: int = default("seed")
    load_format: str = "auto"  # dummy: random weights (benchmarks); not a run setting
    enforce_eager: bool = default("engines.enforce_eager")
    receive_mode: str = default("engines.receive_mode")  # see rlloop.weights.receiver
    kv_after_update: str = default("weights.kv_after_update")  # keep | recompute (KV_AFTER_UPDATE)
    requests_during_swap: str = default("engines.requests_during_swap")  # wait | refuse (swap_model)
    kv_gap_requests: int = default("weights.kv_gap_requests")  # re-scored per update (kv_gap)
    # GPU only: sleep() / wake_up() free and retake the engine's memory
    enable_sleep_mode: bool = default("engines.sleep_while_training")

    def __post_init__(self):
        if self.requests_during_swap not in ("wait", "refuse"):
            raise ValueError(f"engines.requests_during_swap must be wait or refuse, got {self.requests_during_swap!r}")
        if self.kv_after_update not in KV_AFTER_UPDATE:
            raise ValueError(f"weights.kv_after_update must be one of {KV_AFTER_UPDATE}, "
                             f"got {self.kv_after_update!r}")


@dataclass
class Sampling:
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = False
    logprobs: bool = True
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the request (kept in its text and tokens)


@dataclass
class Generation:
    prompt: str | list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]  # of each sampled token under the weights that sampled it
    finish_reason: str | None
    version_start: int  # weight version when the request was admitted
    version_end: int  # weight version when it finished
    # a multi-turn episode (rlloop.agents): which tokens the model sampled (False: tool or
    # environment text, no loss), and the conversation turn by turn
    loss_mask: list[bool] | None = None
    conversation: list[dict] | None = None


@dataclass
class UpdateStats:
    version: int
    mode: str
    bytes: int
    pause_ms: float  # generation stall: the workers' receive (keep), or pause .. resume (recompute)
    receive_ms: float  # receive + load on the workers (slowest worker)
    total_ms: float
    gbps: float
    in_flight: int = 0  # requests in flight when it landed
    kv: str = "keep"  # what the requests in flight did with their KV cache (kv_after_update)
    recomputed_requests: int = 0  # kv="recompute": requests in flight whose KV was dropped
    recomputed_tokens: int = 0  # ... and their tokens so far (prompt + generated), prefilled again
    # the requests the previous update landed in, re-scored on the weights they finished
    # under (rlloop.actors.kv_gap): tokens measured, mean and largest |log-prob gap|
    kv_gap_tokens: int = 0
    kv_gap_mean: float | None = None
    kv_gap_max: float | None = None


@dataclass
class EngineCounters:
    version: int = 0
    updates: int = 0
    rejected_updates: int = 0
    requests_done: int = 0
    tokens_generated: int = 0
    in_flight: int = 0
    swaps: int = 0  # base models replaced in place (swap_model)
    last_swap: dict = field(default_factory=dict)  # its model, load time and memory
    last_update: dict = field(default_factory=dict)

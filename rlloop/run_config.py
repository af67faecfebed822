"""What one run is, section by section as in rlloop/conf/config.yaml. These hold no defaults:
config.py builds them from the composed yaml, the one place where defaults live."""
from __future__ import annotations

from dataclasses import dataclass, field

from rlloop.actors.engine_io import EngineConfig
from rlloop.learner.policy import LearnerConfig
from rlloop.tasks.problem import Problem
from rlloop.tasks.prompts import PromptFormat


@dataclass(frozen=True)
class EnginesConfig:
    engine: EngineConfig  # what each engine's vLLM runs
    count: int
    num_gpus: float | None  # per engine; None: its tensor_parallel_size
    max_restarts: int  # a restarted engine rejoins and gets the current weights
    sleep_while_training: bool  # engines sleep (GPU memory released) while the learner trains
    node_resource: str | None  # only nodes with this custom resource (actors/placement.py)


@dataclass(frozen=True)
class RolloutConfig:
    problems: tuple[Problem, ...]  # the training split: rollouts and SFT draw from it
    function: str  # module:function building the rollout source (rlloop.rollout:Rollouts)
    reward: str  # module:function (completion, answer) -> float
    prompt: PromptFormat
    batch_prompts: int
    group_size: int
    max_tokens: int
    temperature: float
    normalize_std: bool
    max_lag: int  # drop samples begun more than this many versions ago
    zero_advantage: str  # drop | keep | refill (docs/objectives.md)
    refill_rounds: int  # zero_advantage=refill: extra rollouts per step at most
    dump_every: int  # steps; rollouts/step_N.jsonl and eval/step_N.jsonl (0: never)
    agent: str | None  # module:function running multi-turn episodes (rlloop/agents/); None: one turn
    max_turns: int  # model turns per episode, at most
    demonstration: str | None  # module:function (question, answer) -> the SFT warm-up's target text


@dataclass(frozen=True)
class EvalConfig:
    problems: tuple[Problem, ...]  # held out: scored greedily, never trained on
    every: int  # steps (and the last step)
    max_tokens: int  # greedy completion length


@dataclass(frozen=True)
class WeightsConfig:
    backend: str  # auto | ipc | shm | nccl | gloo
    bucket_mb: float
    timeout_s: float


@dataclass(frozen=True)
class TrainerConfig:
    steps: int
    sft_steps: int
    sft_batch: int
    sft_target_reward: float | None  # end the warm-up once a rollout's mean reward reaches it
    sft_check_every: int  # SFT steps between those rollouts
    pipelined: bool
    rollouts_ahead: int  # pipelined: rollouts generating ahead of the step that trains
    checkpoint_every: int  # steps; 0: only at the end
    loggers: tuple[str, ...]  # rlloop/trackers.py: jsonl (always), tensorboard, wandb, mlflow


@dataclass(frozen=True)
class ServerConfig:
    enabled: bool
    host: str
    port: int
    # the control plane's bearer token (config, $RLLOOP_API_KEY or generated) and the /v1
    # routes' key: never printed, never sent to a tracker
    api_key: str = field(repr=False, metadata={"secret": True})
    openai_api_key: str | None = field(repr=False, metadata={"secret": True})
    served_model_name: str | None
    max_body_bytes: int


@dataclass(frozen=True)
class RunConfig:
    name: str
    output_dir: str
    model: str  # the directory engines and learner start from
    seed: int
    resume: str | None  # a checkpoint directory (see Coordinator._checkpoint)
    engines: EnginesConfig
    learner: LearnerConfig
    rollout: RolloutConfig
    eval: EvalConfig
    weights: WeightsConfig
    trainer: TrainerConfig
    server: ServerConfig

"""Turning a Hydra config into typed run configs; a bad value names its key."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rlloop.defaults import CONF_DIR


class ConfigError(ValueError):
    pass


def build_run_config(cfg: DictConfig):
    """Turn the Hydra config into typed dataclasses; a bad value names its key."""
    from rlloop.actors.engine_io import KV_AFTER_UPDATE, EngineConfig
    from rlloop.learner.policy import resolve_loss
    from rlloop.models.tiny import build_tiny_model
    from rlloop.plugins import import_function
    from rlloop.run_config import (EnginesConfig, EvalConfig, RolloutConfig, RunConfig, TrainerConfig,
                                   WeightsConfig)
    from rlloop.tasks.arithmetic import arithmetic_problems
    from rlloop.tasks.rewards import resolve_reward
    from rlloop.trackers import TRACKERS, missing_package

    need = partial(_need, cfg)

    pos_int = lambda v: isinstance(v, int) and v > 0  # noqa: E731
    steps = need("trainer.steps", pos_int, "must be a positive integer")
    engines = need("engines.count", pos_int, "must be a positive integer")
    group = need("rollout.group_size", lambda v: isinstance(v, int) and v >= 2, "must be an integer >= 2")
    need("rollout.batch_prompts", pos_int, "must be a positive integer")
    lag = need("rollout.max_lag", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0")
    ahead = need("trainer.rollouts_ahead", pos_int, "must be a positive integer")
    if cfg.trainer.pipelined and ahead > lag:
        raise ConfigError(f"config key 'trainer.rollouts_ahead': {ahead} rollouts ahead are sampled up to "
                          f"{ahead} versions behind, and rollout.max_lag={lag} would drop them; "
                          f"set rollout.max_lag >= {ahead}")
    need("rollout.zero_advantage", lambda v: v in ("drop", "keep", "refill"), "must be drop, keep or refill")
    need("rollout.refill_rounds", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0")
    need("weights.kv_after_update", lambda v: v in KV_AFTER_UPDATE, f"must be one of {KV_AFTER_UPDATE}")
    need("weights.kv_gap_requests", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0")
    need("engines.requests_during_swap", lambda v: v in ("wait", "refuse"), "must be wait or refuse")
    backend = need("learner.backend", lambda v: v in ("hf", "megatron"), "must be hf or megatron")
    tp = need("learner.tensor_parallel_size", pos_int, "must be a positive integer")
    dp = need("learner.data_parallel_size", pos_int, "must be a positive integer")
    if backend == "hf" and tp * dp != 1:
        raise ConfigError("config key 'learner.tensor_parallel_size': the hf learner is one process; "
                          "use learner.backend=megatron for TP/DP")
    try:
        resolve_loss(cfg.learner.loss)
    except ValueError as e:
        raise ConfigError(f"config key 'learner.loss': {e}") from None
    objective = build_objective(cfg)
    reward = need("rollout.reward", lambda v: isinstance(v, str), "must be a module:function string")
    try:
        resolve_reward(reward)("0", "0")  # imports what it needs, now rather than mid-run
    except ValueError as e:
        raise ConfigError(f"config key 'rollout.reward': {e}") from None
    except ImportError as e:
        raise ConfigError(f"config key 'rollout.reward': {reward} needs the package {e.name!r} "
                          "(pip install -e '.[math]' for math_reward)") from None
    rollout_fn = need("rollout.function", lambda v: isinstance(v, str), "must be a module:function string")
    try:
        import_function(rollout_fn, "rollout function")
    except ValueError as e:
        raise ConfigError(f"config key 'rollout.function': {e}") from None
    agent, demonstration = (need(key, lambda v: v is None or isinstance(v, str), "must be null or a module:function string")
                            for key in ("rollout.agent", "rollout.demonstration"))
    for key, spec in (("rollout.agent", agent), ("rollout.demonstration", demonstration)):
        try:
            if spec is not None:
                import_function(spec, key.split(".")[1])
        except ValueError as e:
            raise ConfigError(f"config key '{key}': {e}") from None
    need("rollout.max_turns", pos_int, "must be a positive integer")
    need("learner.ppo_mini_batches", pos_int, "must be a positive integer")
    sft_target = need("trainer.sft_target_reward", lambda v: v is None or isinstance(v, (int, float)),
                      "must be null or a number")
    sft_every = need("trainer.sft_check_every", pos_int, "must be a positive integer")
    task = need("rollout.task", lambda v: v in ("arithmetic", "jsonl"), "must be arithmetic or jsonl")
    loggers = tuple(need("trainer.loggers", lambda v: OmegaConf.is_list(v) and set(v) <= set(TRACKERS),
                         f"must be a list of {', '.join(TRACKERS)}"))
    if missing := missing_package(loggers):
        raise ConfigError(f"config key 'trainer.loggers': {missing}")
    # The data first: a bad file stops the run before anything is written.
    if task == "arithmetic":
        problems = arithmetic_problems(cfg.rollout.num_problems, cfg.seed, cfg.rollout.max_operand,
                                       cfg.rollout.ops)
    else:
        problems = read_jsonl(cfg, "rollout.jsonl_path")
    problems, eval_problems = eval_split(cfg, problems)
    prompt = prompt_format(cfg)
    out = Path(cfg.output_dir)
    model = cfg.model.path
    resume = None
    if cfg.resume is not None:
        resume = str(latest_checkpoint(cfg.resume))
        model = resume  # engines and learner start from the checkpoint's weights
    elif model is None and cfg.model.preset is not None:
        from rlloop.models.presets import PRESETS, model_dir

        need("model.preset", lambda v: v in PRESETS, f"must be one of {sorted(PRESETS)}")
        model = str(model_dir(cfg.model.preset, out / "initial_model", dtype=cfg.model.dtype, weights=True))
    elif model is None:
        model = str(build_tiny_model(out / "initial_model", seed=cfg.seed))
    elif not (Path(model) / "config.json").is_file():
        raise ConfigError(f"config key 'model.path': no config.json in {model!r} (pass a local HF directory)")
    e = cfg.engines
    sleep = bool(e.sleep_while_training)
    if sleep and (cfg.trainer.pipelined or not torch.cuda.is_available()):
        raise ConfigError("config key 'engines.sleep_while_training': needs a GPU (vLLM sleep mode) and "
                          "trainer.pipelined=false (a sleeping engine cannot generate the next rollout)")
    engine = EngineConfig(model=model, dtype=cfg.model.dtype, tensor_parallel_size=e.tensor_parallel_size,
                          gpu_memory_utilization=e.gpu_memory_utilization, max_model_len=e.max_model_len,
                          max_num_seqs=e.max_num_seqs, seed=cfg.seed, enforce_eager=e.enforce_eager,
                          receive_mode=e.receive_mode, kv_after_update=cfg.weights.kv_after_update,
                          requests_during_swap=e.requests_during_swap, enable_sleep_mode=sleep,
                          kv_gap_requests=cfg.weights.kv_gap_requests)
    return RunConfig(
        name=str(cfg.name), output_dir=str(out), model=model, seed=cfg.seed, resume=resume,
        engines=EnginesConfig(engine=engine, count=engines, num_gpus=e.num_gpus, max_restarts=e.max_restarts,
                              sleep_while_training=sleep, node_resource=e.node_resource),
        learner=learner_config(cfg, model, objective, backend, tp, dp),
        rollout=RolloutConfig(problems=tuple(problems), function=rollout_fn, reward=reward, prompt=prompt,
                              batch_prompts=cfg.rollout.batch_prompts, group_size=group,
                              max_tokens=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature,
                              normalize_std=cfg.rollout.normalize_std, max_lag=lag,
                              zero_advantage=cfg.rollout.zero_advantage, refill_rounds=cfg.rollout.refill_rounds,
                              dump_every=cfg.rollout.dump_every, agent=agent, max_turns=cfg.rollout.max_turns,
                              demonstration=demonstration),
        eval=EvalConfig(problems=tuple(eval_problems), every=cfg.eval.every,
                        max_tokens=cfg.eval.max_tokens or cfg.rollout.max_tokens),
        weights=WeightsConfig(backend=cfg.weights.backend, bucket_mb=cfg.weights.bucket_mb,
                              timeout_s=cfg.weights.timeout_s),
        trainer=TrainerConfig(steps=steps, sft_steps=sft_steps(cfg, task), sft_batch=cfg.trainer.sft_batch,
                              sft_target_reward=sft_target, sft_check_every=sft_every,
                              pipelined=cfg.trainer.pipelined, rollouts_ahead=ahead,
                              checkpoint_every=cfg.trainer.checkpoint_every, loggers=loggers),
        server=server_config(cfg))


def server_config(cfg: DictConfig):
    """The endpoint's settings; keys from the config, else the environment, and a
    control token generated when neither gives one."""
    import os
    import secrets

    from rlloop.run_config import ServerConfig

    need = partial(_need, cfg)
    port = need("server.port", lambda v: isinstance(v, int) and 0 <= v < 65536, "must be a port number (0: any)")
    size = need("server.max_body_bytes", lambda v: isinstance(v, int) and v > 0, "must be a positive integer")
    for key in ("server.api_key", "server.openai_api_key", "server.served_model_name"):
        need(key, lambda v: v is None or (isinstance(v, str) and v.strip() == v and v), "must be null or a non-empty string")
    s = cfg.server
    return ServerConfig(enabled=bool(s.enabled), host=str(s.host), port=port,
                        api_key=s.api_key or os.environ.get("RLLOOP_API_KEY") or secrets.token_urlsafe(24),
                        openai_api_key=s.openai_api_key or os.environ.get("RLLOOP_OPENAI_API_KEY"),
                        served_model_name=s.served_model_name, max_body_bytes=size)


def learner_config(cfg: DictConfig, model: str, objective, backend: str, tp: int, dp: int):
    from rlloop.learner.policy import LearnerConfig

    learner = cfg.learner
    try:
        return LearnerConfig(
            model=model, lr=learner.lr, sft_lr=learner.sft_lr, max_grad_norm=learner.max_grad_norm,
            objective=objective, ppo_mini_batches=learner.ppo_mini_batches, seed=cfg.seed, dtype=learner.dtype,
            backend=backend, tensor_parallel_size=tp, data_parallel_size=dp, micro_batch_size=learner.micro_batch_size,
            max_tokens_per_micro_batch=learner.max_tokens_per_micro_batch, attention=learner.attention,
            recompute=learner.recompute, fp32_grads=learner.fp32_grads, optimizer_offload=learner.optimizer_offload,
            peak_tflops=learner.peak_tflops, freeze=tuple(learner.freeze),
            loss=learner.loss, gpus=learner.gpus, max_restarts=learner.max_restarts,
            node_resource=learner.node_resource)
    except ValueError as e:  # LearnerConfig's own checks name their key: "learner.<key> must ..."
        raise ConfigError(f"config key '{str(e).split()[0]}': {e}") from None


def _need(cfg: DictConfig, key: str, ok, what: str):
    value = OmegaConf.select(cfg, key)
    if not ok(value):
        raise ConfigError(f"config key '{key}': {what}, got {value!r}")
    return value


def read_jsonl(cfg: DictConfig, key: str) -> list:
    from rlloop.tasks.jsonl import jsonl_problems
    from rlloop.tasks.problem import DatasetError

    path = _need(cfg, key, lambda v: v and Path(v).is_file(), "must be an existing JSONL file")
    try:
        return jsonl_problems(path)
    except DatasetError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


def eval_split(cfg: DictConfig, problems: list) -> tuple[list, list]:
    """(train, held out): `eval.path` or `eval.fraction` of the distinct questions. A
    question in both never reaches training."""
    from rlloop.tasks.problem import first_of_each, split_eval, without_prompts

    fraction = _need(cfg, "eval.fraction", lambda v: isinstance(v, (int, float)) and 0 <= v < 1,
                     "must be a number in [0, 1)")
    _need(cfg, "eval.every", lambda v: isinstance(v, int) and v > 0, "must be a positive integer")
    if cfg.eval.path is not None:
        if fraction:
            raise ConfigError("config key 'eval.fraction': set eval.path or eval.fraction, not both")
        held = first_of_each(read_jsonl(cfg, "eval.path"))
        train = without_prompts(problems, {p.prompt for p in held})
    elif fraction:
        train, held = split_eval(problems, fraction, cfg.seed)
    else:
        return problems, []
    if not train:
        raise ConfigError("config key 'eval.fraction': no training problems are left after holding out the eval split")
    return train, held


def prompt_format(cfg: DictConfig):
    from rlloop.tasks.prompts import PromptFormat

    template = _need(cfg, "rollout.prompt_template", lambda v: isinstance(v, str), "must be a string")
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"config key 'rollout.prompt_template': {template!r} must name only {{question}} "
                          f"({type(e).__name__}: {e})") from None
    chat = _need(cfg, "rollout.chat_template", lambda v: v in ("auto", "none") or (v and Path(v).is_file()),
                 "must be auto, none or the path of a Jinja template file")
    if chat not in ("auto", "none"):
        chat = Path(chat).read_text()
    return PromptFormat(template=template, chat_template=chat, system_prompt=cfg.rollout.system_prompt)


# trainer.sft_steps=auto: a randomly initialised tiny model earns no reward on the
# built-in task without a warm-up; a model or data of the user's gets none unless asked.
TINY_WARMUP_STEPS = 40


def sft_steps(cfg: DictConfig, task: str) -> int:
    value = _need(cfg, "trainer.sft_steps", lambda v: v == "auto" or (isinstance(v, int) and v >= 0),
                  "must be auto or an integer >= 0")
    if value != "auto":
        return value
    built_here = cfg.model.path is None and cfg.model.preset is None and cfg.resume is None
    return TINY_WARMUP_STEPS if built_here and task == "arithmetic" else 0


# Objective fields set from config keys other than learner.<field>.
_OBJECTIVE_KEYS = {"aggregation": "learner.loss_aggregation", "norm_tokens": "rollout.max_tokens"}


def build_objective(cfg: DictConfig):
    """The policy objective of `learner.*` (docs/objectives.md); a bad value names its key."""
    from dataclasses import fields

    from rlloop.learner.grpo import Objective

    keys = {f.name: _OBJECTIVE_KEYS.get(f.name, f"learner.{f.name}") for f in fields(Objective)}
    try:
        return Objective(**{name: OmegaConf.select(cfg, key) for name, key in keys.items()})
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise ConfigError(f"config key '{keys.get(field, 'learner')}': {e}") from None


def latest_checkpoint(path: str) -> Path:
    """`path` itself if it is a checkpoint, else the newest one in <path>/checkpoints."""
    p = Path(path)
    if (p / "run_state.json").is_file():
        return p
    found = sorted((p / "checkpoints").glob("step_*/run_state.json"))
    if not found:
        raise ConfigError(f"config key 'resume': no checkpoint in {path!r}")
    return found[-1].parent


def compose_config(overrides: list[str]) -> DictConfig:
    """The Hydra config as `python -m rlloop.train <overrides>` would see it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("config", overrides=overrides)

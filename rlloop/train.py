"""Entry point: `python -m rlloop.train +conf=grpo [overrides]`.

Reads the Hydra config (conf/), builds the tiny model when no model.path is given,
starts a local Ray cluster (or joins RAY_ADDRESS), runs the coordinator and prints a
one-line summary. Metrics go to <output_dir>/metrics.jsonl, the curve to reward.png.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

_REPO_CONF = Path(__file__).resolve().parent.parent / "conf"
# From a checkout (or an editable install) use the repo's conf/; a wheel ships it as rlloop.conf.
CONFIG_PATH = str(_REPO_CONF) if _REPO_CONF.is_dir() else "pkg://rlloop.conf"


class ConfigError(ValueError):
    pass


def build_run_config(cfg: DictConfig):
    """Turn the Hydra config into typed dataclasses; a bad value names its key."""
    from rlloop.actors.coordinator import RunConfig
    from rlloop.actors.engine import EngineConfig
    from rlloop.learner.hf_learner import LearnerConfig
    from rlloop.models.tiny import build_tiny_model
    from rlloop.tasks.arithmetic import arithmetic_problems, jsonl_problems

    def need(key, ok, what):
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"config key '{key}': {what}, got {value!r}")
        return value

    pos_int = lambda v: isinstance(v, int) and v > 0  # noqa: E731
    steps = need("trainer.steps", pos_int, "must be a positive integer")
    engines = need("engines.count", pos_int, "must be a positive integer")
    group = need("rollout.group_size", lambda v: isinstance(v, int) and v >= 2, "must be an integer >= 2")
    need("rollout.batch_prompts", pos_int, "must be a positive integer")
    need("rollout.max_lag", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0")
    need("learner.loss_aggregation", lambda v: v in ("token-mean", "sequence-mean"),
         "must be token-mean or sequence-mean")
    task = need("rollout.task", lambda v: v in ("arithmetic", "jsonl"), "must be arithmetic or jsonl")
    out = Path(cfg.output_dir)
    model = cfg.model.path
    if model is None:
        model = str(build_tiny_model(out / "initial_model", seed=cfg.seed))
    elif not (Path(model) / "config.json").is_file():
        raise ConfigError(f"config key 'model.path': no config.json in {model!r} (pass a local HF directory)")
    if task == "arithmetic":
        problems = arithmetic_problems(cfg.rollout.num_problems, cfg.seed, cfg.rollout.max_operand,
                                       cfg.rollout.ops)
    else:
        path = need("rollout.jsonl_path", lambda v: v and Path(v).is_file(), "must be an existing JSONL file")
        problems = jsonl_problems(path)
    e = cfg.engines
    return RunConfig(
        name=str(cfg.name), output_dir=str(out), model=model, problems=tuple(problems),
        engine=EngineConfig(model=model, dtype=cfg.model.dtype, tensor_parallel_size=e.tensor_parallel_size,
                            gpu_memory_utilization=e.gpu_memory_utilization, max_model_len=e.max_model_len,
                            max_num_seqs=e.max_num_seqs, seed=cfg.seed, enforce_eager=e.enforce_eager,
                            receive_mode=e.receive_mode),
        learner=LearnerConfig(model=model, lr=cfg.learner.lr, sft_lr=cfg.learner.sft_lr,
                              max_grad_norm=cfg.learner.max_grad_norm, clip_eps=cfg.learner.clip_eps,
                              aggregation=cfg.learner.loss_aggregation, kl_coef=cfg.learner.kl_coef,
                              tis_cap=cfg.learner.tis_cap, seed=cfg.seed),
        engines=engines, steps=steps, sft_steps=cfg.trainer.sft_steps, sft_batch=cfg.trainer.sft_batch,
        batch_prompts=cfg.rollout.batch_prompts, group_size=group, max_tokens=cfg.rollout.max_tokens,
        temperature=cfg.rollout.temperature, normalize_std=cfg.rollout.normalize_std,
        max_lag=cfg.rollout.max_lag, pipelined=cfg.trainer.pipelined, bucket_mb=cfg.weights.bucket_mb,
        backend=cfg.weights.backend, timeout_s=cfg.weights.timeout_s, seed=cfg.seed)


def run(cfg: DictConfig) -> dict:
    import ray

    from rlloop.actors.coordinator import Coordinator, summary_line

    run_cfg = build_run_config(cfg)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=cfg.ray.dashboard,
                 log_to_driver=cfg.ray.log_to_driver,
                 runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ["VLLM_LOGGING_LEVEL"]}})
    coord = ray.remote(Coordinator).options(name=f"{run_cfg.name}/coordinator", num_cpus=0,
                                            max_concurrency=4).remote(run_cfg)
    try:
        summary = _run_with_progress(coord, run_cfg.steps)
    finally:
        ray.get(coord.shutdown.remote())
    print(summary_line(summary), flush=True)
    return summary


def _run_with_progress(coord, steps: int) -> dict:
    import ray
    from tqdm import tqdm

    done = coord.run.remote()
    with tqdm(total=steps, desc="grpo", unit="step", file=sys.stderr) as bar:
        while True:
            ready, _ = ray.wait([done], timeout=1.0)
            p = ray.get(coord.progress.remote())
            bar.update(p["step"] - bar.n)
            if p["last"]:
                bar.set_postfix(reward=f"{p['last']['reward_mean']:.2f}", v=p["last"]["weight_version"])
            if ready:
                return ray.get(done)


@hydra.main(version_base=None, config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

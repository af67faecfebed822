"""What a run reports from its per-step rows: the summary and its one-line form, the
reward curve (reward.png, and RunHandle.plot), and JSONL dumps of what the model saw
and wrote. The coordinator and the notebook handle both use it."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path


def write_run_report(history: list[dict], name: str, out: Path, counts: dict) -> dict:
    """A finished run's summary.json (summarize's numbers and `counts`) and reward.png,
    in `out`; returns the summary."""
    summary = {"name": name, **summarize(history), **counts, "output_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_run(history, name, out / "reward.png")
    return summary


def summarize(history: list[dict]) -> dict:
    r = [h["reward_mean"] for h in history]
    k = max(1, min(10, len(r) // 2))  # first and last k steps never overlap
    stalls = sorted(h["stall_ms"] for h in history if h.get("stall_ms") is not None)
    out = {"steps": len(r), "reward_first": sum(r[:k]) / max(len(r[:k]), 1),
           "reward_last": sum(r[-k:]) / max(len(r[-k:]), 1), "reward_k": k,
           "stall_ms_median": stalls[len(stalls) // 2] if stalls else None,
           "tok_s_mean": sum(h["tok_s"] for h in history) / max(len(r), 1)}
    for key in ("learner_tok_s", "learner_tflops", "learner_mfu"):  # the learner's speed
        if (median := _median(history, key)) is not None:
            out[f"{key}_median"] = median
    evals = [h for h in history if h.get("eval_accuracy") is not None]
    if evals:
        out.update(eval_first=evals[0]["eval_accuracy"], eval_last=evals[-1]["eval_accuracy"],
                   eval_best=max(h["eval_accuracy"] for h in evals), eval_problems=evals[-1]["eval_problems"])
    return out


TARGET_WINDOW = 5  # steps averaged for time-to-reward


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def mode_numbers(rows: list[dict], summary: dict | None, target: float) -> dict:
    """What a user compares between runs (scripts/compare_modes.py), from a run's
    metrics.jsonl rows and summary.json (None: the run was stopped before its end):
    steps/hour over the GRPO steps, startup and SFT apart; medians; and the wall time
    until TARGET_WINDOW consecutive steps average `target` reward."""
    t = [r["time_s"] for r in rows]
    grpo_start = t[0] - (t[1] - t[0]) if len(t) > 1 else 0.0  # step 0 began about one step before it ended
    steady = (len(t) - 1) / (t[-1] - t[0]) * 3600 if len(t) > 1 else None
    rewards = [r["reward_mean"] for r in rows]
    reached = next((i for i in range(TARGET_WINDOW - 1, len(rows))
                    if sum(rewards[i - TARGET_WINDOW + 1:i + 1]) / TARGET_WINDOW >= target), None)
    curve = summarize(rows)
    return {
        "steps": len(rows), "steps_per_hour": steady, "startup_and_sft_s": grpo_start,
        "gen_tok_s_median": _median(rows, "tok_s"), "learner_tok_s_median": _median(rows, "learner_tok_s"),
        "update_ms_median": _median(rows, "update_ms"), "stall_ms_median": _median(rows, "stall_ms"),
        "train_ms_median": _median(rows, "train_ms"), "logprob_gap_median": _median(rows, "logprob_gap"),
        "reward_first10": curve["reward_first"], "reward_last10": curve["reward_last"],
        "eval_last": curve.get("eval_last"),
        "reward_target": target, "target_step": reached,
        "time_to_target_s": rows[reached]["time_s"] if reached is not None else None,
        "grpo_time_to_target_s": rows[reached]["time_s"] - grpo_start if reached is not None else None,
        "samples_min": min(r["samples"] for r in rows), "generated_min": min(r["generated"] for r in rows),
        "weight_version": summary["weight_version"] if summary else None,
        "sft_checks": summary.get("sft_checks") if summary else None,
        "wall_s": summary["wall_s"] if summary else None, "finished": summary is not None,
    }


def plot_reward_vs_time(curves: list[tuple[str, dict]], path: Path) -> None:
    """Reward against wall time from the first GRPO step, one line per (label,
    mode_numbers + "rows") run: startup and the SFT warm-up (kernel caches warm or
    cold) are reported apart, as startup_and_sft_s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in curves:
        ax.plot([x["time_s"] - r["startup_and_sft_s"] for x in r["rows"]], [x["reward_mean"] for x in r["rows"]],
                "-", label=f"{label} ({r['steps_per_hour']:.0f} steps/h)")
    ax.set_xlabel("wall time from the first GRPO step (s)")
    ax.set_ylabel("reward (rollout mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(packages: tuple[str, ...]) -> dict:
    """What a benchmark record says it ran on: Python, the date, each package's version
    (a missing one is part of the record), the device and the checkout's commit."""
    import platform
    import subprocess
    import time

    env = {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    for name in packages:
        try:
            env[name] = __import__(name, fromlist=["__version__"]).__version__
        except Exception as e:
            env[name] = f"unavailable ({type(e).__name__})"
    try:
        import torch

        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    except Exception:
        env["device"] = "unknown"
    try:
        # this checkout's commit, wherever the benchmark runs from (benches run from /tmp)
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        env["commit"] = None
    return env


def summary_line(summary: dict) -> str:
    k = summary["reward_k"]
    held_out = (f", eval {summary['eval_first']:.2f} -> {summary['eval_last']:.2f} on "
                f"{summary['eval_problems']} held-out problems" if "eval_last" in summary else "")
    return (f"{summary['name']}: {summary['steps']} steps in {summary['wall_s']:.0f}s, train reward "
            f"{summary['reward_first']:.2f} (first {k}) -> {summary['reward_last']:.2f} (last {k}){held_out}, "
            f"weights v{summary['weight_version']}, median stall {summary['stall_ms_median'] or 0:.0f} ms, "
            f"{summary['tok_s_mean']:.0f} tok/s; {summary['output_dir']}")


def draw(history: list[dict], title: str, axes) -> None:
    """Training reward (and its 5-step average) on axes[0]; with a second axis and an
    eval split, the held-out accuracy on axes[1]."""
    steps = [h["step"] for h in history]
    r = [h["reward_mean"] for h in history]
    ax = axes[0]
    ax.plot(steps, r, label="reward (mean)")
    w = 5
    if len(r) >= w:
        ax.plot(steps[w - 1:], [sum(r[i - w + 1:i + 1]) / w for i in range(w - 1, len(r))], label=f"{w}-step average")
    ax.set(xlabel="step", ylabel="train reward", ylim=(-0.02, 1.02), title=title)
    ax.legend(loc="lower right")
    if len(axes) > 1:
        evals = [h for h in history if h.get("eval_accuracy") is not None]
        axes[1].plot([h["step"] for h in evals], [h["eval_accuracy"] for h in evals], "o-", color="C2",
                     label="held-out accuracy (greedy)")
        axes[1].set(xlabel="step", ylabel="eval accuracy", ylim=(-0.02, 1.02), title="eval split")
        axes[1].legend(loc="lower right")


def plot_run(history: list[dict], title: str, path: Path | None = None):
    """One panel, or two when the run has an eval split; saved to `path` if given."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if any(h.get("eval_accuracy") is not None for h in history) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.5), squeeze=False)
    draw(history, title, list(axes[0]))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

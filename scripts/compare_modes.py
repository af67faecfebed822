"""The same recipe, seed and step count run synchronously and pipelined, side by side:

- synchronous: generate, train, update; with --sleep the engine sleeps (vLLM sleep
  mode, GPU memory released) while the learner trains.
- pipelined:   the next rollout generates while the learner trains; weights land in
  flight (the engine pauses for the copy, no request is dropped).

Per mode: steps/hour over the GRPO steps (startup and SFT warm-up excluded, reported
apart), generation tok/s, learner tok/s, update and stall medians, reward of the first
and last 10 steps, and the wall time (from the run's start, and from its first GRPO
step) until the mean reward of 5 consecutive steps reaches --reward-target. JSON out,
and a reward-vs-wall-time PNG beside it.

GPU:  python scripts/compare_modes.py --json docs/results/modes.json +conf=grpo_gpu
CPU:  python scripts/compare_modes.py --json runs/modes.json +conf=grpo trainer.steps=20
(anything after the options is a Hydra override given to both runs)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rlloop.run_report import environment, mode_numbers, plot_reward_vs_time

MODES = {"synchronous": ["trainer.pipelined=false"], "pipelined": ["trainer.pipelined=true"]}
def run_mode(mode: str, overrides: list[str], out: Path, timeout_s: float) -> tuple[list[dict], dict | None]:
    run_dir = out / mode
    cmd = [sys.executable, "-m", "rlloop.train", *overrides, *MODES[mode], f"output_dir={run_dir}",
           f"name=compare-{mode}"]
    print(f"[compare] {mode}: {' '.join(cmd[2:])}", flush=True)
    with open(out / f"{mode}.log", "w") as log:
        # Its own process group: a run stopped at its share takes its Ray cluster (the
        # local one its driver started: engines, learner, GPU memory) down with it.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"[compare] {mode}: stopped after {timeout_s:.0f} s; reporting the steps it finished", flush=True)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else None
    return rows, summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="results file; the plot and each run go beside it")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--reward-target", type=float, default=0.6)
    ap.add_argument("--sleep", action="store_true", help="synchronous: engines sleep while the learner trains")
    ap.add_argument("--budget-s", type=float, default=3600,
                    help="for all modes; each gets an equal share of what is left, and a run stopped "
                         "at its share reports the steps it finished")
    args, overrides = ap.parse_known_args(argv)
    out = Path(args.json).with_suffix("")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    deadline = time.time() + args.budget_s
    for i, mode in enumerate(args.modes):
        extra = ["engines.sleep_while_training=true"] if args.sleep and mode == "synchronous" else []
        share = (deadline - time.time()) / (len(args.modes) - i)
        rows, summary = run_mode(mode, [*overrides, *extra], out, share)
        if not rows:
            print(f"[compare] {mode}: no step finished; see {out / (mode + '.log')}", flush=True)
            continue
        results[mode] = {"overrides": [*overrides, *MODES[mode], *extra],
                         **mode_numbers(rows, summary, args.reward_target), "rows": rows}
        print(f"[compare] {mode}: " + json.dumps({k: v for k, v in results[mode].items()
                                                  if k not in ("rows", "sft_checks", "overrides")}), flush=True)
        # After every mode, not only at the end: a caller that stops this script (an outer
        # timeout) still finds the modes that finished (2026-12-03: one lost its JSON so).
        write(args.json, results)
    if not results:
        write(args.json, results)
    print(f"[compare] wrote {args.json}", flush=True)


def write(path: str, results: dict) -> None:
    record = {"environment": environment(("torch", "vllm", "ray", "megatron.core")), "modes": results}
    if {"synchronous", "pipelined"} <= set(results) and results["synchronous"]["steps_per_hour"]:
        record["pipelined_over_synchronous"] = (results["pipelined"]["steps_per_hour"]
                                                / results["synchronous"]["steps_per_hour"])
    Path(path).write_text(json.dumps(record, indent=1))
    if results:
        plot_reward_vs_time(list(results.items()), Path(path).with_suffix(".png"))


if __name__ == "__main__":
    main()

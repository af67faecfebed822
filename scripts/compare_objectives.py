"""Compare objectives by their reward curves over seeds (JSON and PNG out).

    python scripts/compare_objectives.py --steps 100 --seeds 0 1 2 \
        --variant "behaviour=learner.anchor=behaviour" \
        --variant "decoupled=learner.anchor=proximal" \
        --common rollout.max_lag=2 learner.ppo_mini_batches=2 \
        --out docs/results/cpu_objectives_lag

Each variant is `name=override[,override...]` (Hydra overrides on top of +conf=grpo
and --common). Every (variant, seed) is one run, one after another on one Ray
cluster; the JSON holds each run's reward series and summary, the PNG each variant's
mean curve (5-step moving average) with its min-max band over seeds.
"""
from __future__ import annotations

import argparse
import json
import platform
import textwrap
import time
from pathlib import Path


def run_all(variants: dict[str, list[str]], common: list[str], seeds: list[int], steps: int,
            workdir: Path) -> dict:
    import rlloop

    results: dict[str, list[dict]] = {name: [] for name in variants}
    for name, overrides in variants.items():
        for seed in seeds:
            run_name = f"cmp-{name}-s{seed}"
            handle = rlloop.launch([f"trainer.steps={steps}", f"seed={seed}", f"name={run_name}",
                                    f"output_dir={workdir / run_name}", *common, *overrides])
            summary = handle.wait()
            rows = handle.metrics()
            results[name].append({"seed": seed, "reward": rows["reward_mean"].tolist(),
                                  "lag_max": rows["lag_max"].tolist(), "summary": summary})
            print(f"{name} seed {seed}: reward {summary['reward_first']:.3f} -> {summary['reward_last']:.3f} "
                  f"in {summary['wall_s']:.0f}s", flush=True)
    return results


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in results.items():
        curves = np.array([r["reward"] for r in runs])
        kernel = np.ones(5) / 5
        smooth = np.array([np.convolve(c, kernel, mode="valid") for c in curves])
        x = np.arange(smooth.shape[1]) + 4
        line, = ax.plot(x, smooth.mean(0), label=f"{name} (mean of {len(runs)} seeds)")
        ax.fill_between(x, smooth.min(0), smooth.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("reward (5-step average)")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="name=override[,override...]")
    ap.add_argument("--common", nargs="*", default=[], help="overrides for every variant")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", required=True, help="path prefix: writes <out>.json and <out>.png")
    ap.add_argument("--workdir", default="runs/compare")
    args = ap.parse_args()
    variants = {}
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        variants[name] = [o for o in overrides.split(",") if o]
    t0 = time.time()
    results = run_all(variants, args.common, args.seeds, args.steps, Path(args.workdir))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    last = {name: [sum(r["reward"][-20:]) / len(r["reward"][-20:]) for r in runs] for name, runs in results.items()}
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "steps": args.steps, "seeds": args.seeds, "common": args.common, "variants": variants,
              "reward_last20_per_seed": last,
              "reward_last20_mean": {k: sum(v) / len(v) for k, v in last.items()},
              "wall_s": time.time() - t0, "runs": results}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(results, out.with_suffix(".png"), " vs ".join(variants) + f", {' '.join(args.common)}")
    print(json.dumps({k: report[k] for k in ("reward_last20_per_seed", "reward_last20_mean", "wall_s")}, indent=1))


if __name__ == "__main__":
    main()

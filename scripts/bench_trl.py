"""A peer for rlloop's GRPO numbers: TRL's GRPOTrainer on the same model, task, prompts,
batch and objective settings, timed the way scripts/compare_modes.py times rlloop.

Fair setup: both start from the SAME weights, an rlloop checkpoint written after the
SFT warm-up, e.g. on one GPU:

    python -m rlloop.train +conf=grpo_gpu trainer.steps=1 output_dir=runs/warm
    # rlloop from it; sft_steps=0: one check rollout (its draws are what --sft-checks 1
    # skips) and never an SFT step, even if that check samples under the target:
    python scripts/compare_modes.py --json runs/rlloop_from_warm.json --modes pipelined \\
        +conf=grpo_gpu model.path=runs/warm/checkpoints/step_000001 trainer.sft_steps=0
    # TRL from it, vLLM in colocate mode (vLLM in the trainer's process, sharing the GPU):
    python scripts/bench_trl.py --model runs/warm/checkpoints/step_000001 --json runs/trl.json

Needs trl (written against 1.16.0, whose vLLM range is 0.22-0.31, so vLLM 0.26 of the
GPU set fits), datasets and accelerate. CPU smoke test (no vLLM; transformers' generate
instead; with vLLM CPU 0.32, outside TRL's range, the colocated engine starts but TRL's
first weight sync fails in vLLM's load_weights: "'Parameter' object has no attribute
'weight_loader'"):

    python -m rlloop.train +conf=grpo trainer.steps=1 output_dir=/tmp/r1
    python scripts/bench_trl.py --model /tmp/r1/checkpoints/step_000001 --json /tmp/trl.json \\
        --no-vllm --no-bf16 --steps 3 --max-operand 9 --num-problems 1000 --sft-checks 0

What is the same as rlloop's recipe (rlloop/conf/conf/grpo_gpu.yaml): the problems (rlloop's
arithmetic_problems with the same seed, count and max operand, the same held-out split
removed), the prompt text (rlloop's PromptEncoder: the character tokenizer has no chat
template, so the prompt is the raw question "a+b="), the reward (numeric_reward), and
the prompts of every step: step k trains on exactly the 64 problems rlloop draws for its
step k with the same seed (its random.Random(seed) replayed, after the draws of
--sft-checks SFT-check rollouts; a model that already earns the target makes one check).
64 prompts x 8 samples per step, up to 4 new tokens, temperature 1.0, lr 2e-5 constant,
Adam without weight decay, gradient clipping at 1.0, bf16 compute over fp32 master
weights, beta=0 (no KL, no reference model), PPO clip 0.2, group-std advantages, one
optimizer step per rollout (two micro-batches of 256, as learner.micro_batch_size).
What is TRL's own: its loss normalisation (loss_type='dapo', tokens of the whole batch;
rlloop drops zero-advantage groups before its token mean), its vLLM importance-sampling
correction (on by default), and its weight sync (state dict -> vLLM load_weights each
step). Gradient checkpointing (TRL's default) is off, as rlloop has none.

Timing: rows carry time_s from this script's start; steps/hour, time-to-target and the
first/last-10 reward come from rlloop.run_report.mode_numbers, the function
compare_modes.py uses, so the definitions are identical (steady steps/hour excludes the
first step; the target is the mean reward of 5 consecutive steps).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rlloop from this checkout


def rlloop_prompt_order(args) -> tuple[list, list]:
    """(train problems in the order rlloop's steps draw them, held-out problems)."""
    from rlloop.tasks.arithmetic import arithmetic_problems
    from rlloop.tasks.problem import split_eval

    problems = arithmetic_problems(args.num_problems, args.seed, args.max_operand, args.ops)
    train, held = split_eval(problems, args.eval_fraction, args.seed) if args.eval_fraction else (problems, [])
    rng = random.Random(args.seed)  # the coordinator's self.rng
    for _ in range(args.sft_checks * args.batch_prompts):  # each SFT check is one rollout's draws
        rng.choice(train)
    # One extra step of prompts: TRL's sampler drops a last partial chunk, never a whole one.
    return [rng.choice(train) for _ in range((args.steps + 1) * args.batch_prompts)], held


def greedy_eval(model, tokenizer, encoder, held, max_tokens: int, batch: int = 256) -> float | None:
    """Greedy accuracy on the held-out problems with the policy model (transformers'
    generate, left padding): rlloop's eval_accuracy, computed on the trainer's side."""
    import torch

    from rlloop.tasks.rewards import numeric_reward

    if not held:
        return None
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    right = 0
    try:
        for i in range(0, len(held), batch):
            chunk = held[i:i + batch]
            enc = tokenizer([encoder.text(p.prompt) for p in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            right += sum(numeric_reward(t, p.answer) for t, p in zip(texts, chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return right / len(held)


def plot(record: dict, rlloop: dict | None, path: Path) -> None:
    """TRL's curve, and beside it the modes of a compare_modes.py JSON."""
    from rlloop.run_report import plot_reward_vs_time

    modes = (rlloop or {}).get("modes", {})
    curves = [(f"rlloop {mode}", r) for mode, r in modes.items() if "rows" in r]
    for mode in modes.keys() - {label.removeprefix("rlloop ") for label, _ in curves}:
        print(f"[bench_trl] the rlloop JSON's {mode!r} has no per-step rows: not plotted", flush=True)
    vllm = " + vLLM colocate" if record["trl_config"]["use_vllm"] else " (no vLLM)"
    plot_reward_vs_time([*curves, ("TRL GRPOTrainer" + vllm, record)], path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF directory (an rlloop checkpoint: safetensors + tokenizer)")
    ap.add_argument("--json", required=True, help="results file; TRL's output_dir and the PNG go beside it")
    ap.add_argument("--rlloop-json", help="a compare_modes.py JSON whose curves the PNG shows beside TRL's")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG of an existing --json")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps = rollouts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch-prompts", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=256, help="samples per forward/backward")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--num-problems", type=int, default=100000)
    ap.add_argument("--max-operand", type=int, default=99)
    ap.add_argument("--ops", default="+")
    ap.add_argument("--eval-fraction", type=float, default=0.02)
    ap.add_argument("--sft-checks", type=int, default=1,
                    help="SFT-check rollouts the rlloop run made before its first GRPO step (their draws are "
                         "skipped so the prompts match step for step); 1 for a model that earns the target, "
                         "0 without sft_target_reward")
    ap.add_argument("--reward-target", type=float, default=0.6)
    ap.add_argument("--no-vllm", dest="vllm", action="store_false", help="generate with transformers instead")
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--vllm-sleep", action="store_true", help="vllm_enable_sleep_mode (offload during the update)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 compute (CPU)")
    ap.add_argument("--no-eval", dest="eval", action="store_false", help="skip the greedy held-out eval")
    args = ap.parse_args(argv)
    rlloop = json.loads(Path(args.rlloop_json).read_text()) if args.rlloop_json else None
    if args.replot:
        plot(json.loads(Path(args.json).read_text()), rlloop, Path(args.json).with_suffix(".png"))
        return
    if not args.model:
        ap.error("--model is required (unless --replot)")

    # vLLM colocate runs with distributed_executor_backend=external_launcher: it reads the
    # torch.distributed variables that accelerate/torchrun would set; one process here.
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(k, v)

    import torch
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlloop.run_report import environment, mode_numbers
    from rlloop.tasks.prompts import PromptEncoder, PromptFormat
    from rlloop.tasks.rewards import numeric_reward

    out = Path(args.json).with_suffix("")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    encoder = PromptEncoder(tokenizer, PromptFormat())  # rlloop's defaults: raw question, no chat template
    order, held = rlloop_prompt_order(args)
    # An explicit fingerprint: datasets would otherwise hash the Arrow table with dill,
    # which recursed and failed on pyarrow 26's MonthDayNano type here.
    data = Dataset(InMemoryTable.from_pydict({"prompt": [encoder.text(p.prompt) for p in order],
                                              "answer": [p.answer for p in order],
                                              "problem_id": [p.id for p in order]}),
                   fingerprint=f"rlloop-arithmetic-{args.seed}-{args.num_problems}-{args.max_operand}")

    def reward(prompts, completions, answer, **_):
        return [numeric_reward(c, a) for c, a in zip(completions, answer)]

    per_step = args.batch_prompts * args.group_size
    if per_step % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide {per_step} samples per step")
    config = GRPOConfig(
        output_dir=str(out), max_steps=args.steps, seed=args.seed, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=per_step // args.micro_batch,
        num_generations=args.group_size, max_completion_length=args.max_tokens, temperature=args.temperature,
        beta=0.0, epsilon=0.2, scale_rewards="group", num_iterations=1, shuffle_dataset=False,
        bf16=args.bf16, gradient_checkpointing=False, model_init_kwargs={"dtype": "float32"},
        use_vllm=args.vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        vllm_max_model_length=512, vllm_enable_sleep_mode=args.vllm_sleep,
        logging_steps=1, save_strategy="no", report_to=[], log_completions=False, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )

    rows: list[dict] = []
    first_prompts: dict[int, list[str]] = {}

    class Record(TrainerCallback):
        """One row per optimizer step: its rollout's mean reward and the wall time at its end."""

        def on_log(self, _args, state, _control, logs=None, **_):
            if logs and "reward" in logs and "train_runtime" not in logs:
                now = time.perf_counter() - T0
                # TRL logs no generation-only time: tok_s here is the step's completion tokens
                # over the step's wall time (rlloop's tok_s is generation alone); the JSON
                # reports it as step_tok_s_median, not gen_tok_s_median.
                since = now - rows[-1]["time_s"] if rows else float(logs.get("step_time") or 0) or None
                tokens = float(logs.get("completions/mean_length", 0)) * per_step
                rows.append({"step": state.global_step - 1, "reward_mean": float(logs["reward"]),
                             "time_s": now, "samples": per_step, "generated": per_step,
                             "tok_s": tokens / since if since else 0.0,
                             **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}})

    t_init = time.perf_counter()
    trainer = GRPOTrainer(model=args.model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Record()])
    init_s = time.perf_counter() - t_init
    # The prompts TRL's sampler hands out for step 0 (a check that the order is rlloop's).
    sampler = iter(trainer._get_train_sampler(data))
    first_prompts[0] = [data[next(sampler)]["problem_id"] for _ in range(per_step)][::args.group_size]
    eval_first = greedy_eval(trainer.model, tokenizer, encoder, held, args.max_tokens) if args.eval else None
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train
    eval_last = greedy_eval(trainer.model, tokenizer, encoder, held, args.max_tokens) if args.eval else None

    numbers = mode_numbers(rows, None, args.reward_target) if rows else {}
    if rows:
        numbers["step_tok_s_median"] = numbers.pop("gen_tok_s_median")
    numbers.update(wall_s=time.perf_counter() - T0, finished=len(rows) == args.steps)
    record = {
        "environment": environment(("trl", "transformers", "torch", "vllm", "accelerate", "datasets")),
        "args": vars(args),
        "trl_config": {k: getattr(config, k) for k in (
            "use_vllm", "vllm_mode", "loss_type", "scale_rewards", "beta", "epsilon", "learning_rate",
            "lr_scheduler_type", "per_device_train_batch_size", "gradient_accumulation_steps",
            "generation_batch_size", "steps_per_generation", "num_generations", "max_completion_length",
            "temperature", "bf16", "gradient_checkpointing", "vllm_importance_sampling_correction",
            "vllm_gpu_memory_utilization", "vllm_enable_sleep_mode")},
        "trainer_init_s": init_s, "train_s": train_s, "eval_first": eval_first, "eval_last_greedy_hf": eval_last,
        "step0_problem_ids": first_prompts[0], **numbers, "rows": rows,
    }
    Path(args.json).write_text(json.dumps(record, indent=1, default=str))
    if rows:
        plot(record, rlloop, Path(args.json).with_suffix(".png"))
    keep = ("steps", "steps_per_hour", "startup_and_sft_s", "reward_first10", "reward_last10",
            "grpo_time_to_target_s", "wall_s")
    print("[bench_trl] " + json.dumps({k: numbers.get(k) for k in keep} | {
        "trainer_init_s": round(init_s, 1), "eval_first": eval_first, "eval_last": eval_last}), flush=True)
    print(f"[bench_trl] wrote {args.json}", flush=True)


if __name__ == "__main__":
    main()

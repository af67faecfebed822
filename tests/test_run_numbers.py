"""What scripts/compare_modes.py reports from a run's metrics rows (pure)."""
import pytest

from rlloop.run_report import mode_numbers


def _rows(rewards, step_s=2.0, start_s=30.0):
    return [{"time_s": start_s + step_s * (i + 1), "reward_mean": r, "tok_s": 100.0 + i, "samples": 64,
             "generated": 64, "update_ms": 5.0, "stall_ms": 3.0, "train_ms": 40.0, "learner_tok_s": 900.0}
            for i, r in enumerate(rewards)]


def test_steps_per_hour_leaves_out_startup_and_time_to_reward_needs_a_window():
    rewards = [0.1] * 10 + [0.9, 0.1] * 3 + [0.7] * 10
    got = mode_numbers(_rows(rewards), None, target=0.6)
    assert got["steps_per_hour"] == pytest.approx(1800)  # one step per 2 s, the 30 s start excluded
    assert got["startup_and_sft_s"] == pytest.approx(30)
    # A lucky step does not count: 5 consecutive steps (0.9, 0.1, 0.7, 0.7, 0.7) first
    # average >= 0.6 at step 18; the alternating ones before reach 0.58.
    assert got["target_step"] == 18 and got["time_to_target_s"] == pytest.approx(30 + 2 * 19)
    assert got["grpo_time_to_target_s"] == pytest.approx(38)
    assert got["reward_first10"] == pytest.approx(0.1) and got["reward_last10"] == pytest.approx(0.7)
    assert not got["finished"]


def test_a_run_that_never_reaches_the_target_says_so():
    got = mode_numbers(_rows([0.1] * 12), None, target=0.6)
    assert got["target_step"] is None and got["time_to_target_s"] is None

"""bench/ scripts' bookkeeping (their measurements run in bench/, not here)."""

import importlib.util
import json
import os
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_learning_bench_reuses_finished_runs_and_skips_runs_claimed_by_a_live_invocation(tmp_path):
    lb = load("learning")
    job = dict(task="Hopper-v5", method="sac", seed=1, steps=20000, scale=1.0, out=str(tmp_path))
    path = lb.job_path(tmp_path, job)
    assert path.name == "Hopper-v5__sac__s1__x1__20000.json"
    path.parent.mkdir(parents=True)
    # claimed by a live process (this one): another invocation leaves it alone
    path.with_suffix(".running").write_text(str(os.getpid()))
    assert lb.run_cached(job) is None
    # finished: the stored result comes back without training
    done = {**job, "curve": [[20000, 312.5]], "final": 312.5, "wall_s": 1.0}
    path.write_text(json.dumps(done))
    assert lb.run_cached(job) == done


def test_learning_bench_scores_a_curve_by_its_last_five_evaluations_and_its_time_averaged_return():
    lb = load("learning")
    # peaks early and collapses: the last evaluations say so, the area remembers the peak
    curve = [(1000, 0.0), (2000, 600.0), (3000, 600.0), (4000, 100.0), (5000, 100.0), (6000, 100.0),
             (7000, 100.0), (8000, 100.0)]
    assert lb.last_k_mean(curve) == 100.0
    assert lb.last_k_mean(curve[:3], k=5) == 400.0  # fewer than k: all of them
    # trapezoids 300 + 600 + 350 + 100 * 4 = 1650 (x1000 steps) over 7000 steps
    assert abs(lb.auc(curve) - 1650 / 7) < 1e-9
    assert lb.auc([(1000, 42.0)]) == 42.0
    # uneven spacing weighs by steps: a late extra point does not count as a whole evaluation
    assert abs(lb.auc([(0, 0.0), (10, 100.0), (11, 100.0)]) - (500 + 100) / 11) < 1e-9


def test_learning_bench_relative_score_is_the_ratio_for_positive_returns_and_symmetric_for_negative_ones():
    lb = load("learning")
    assert lb.relative_score(180.0, 360.0) == 0.5
    assert abs(lb.relative_score(-200.0, -150.0) - 2 / 3) < 1e-9  # 33 % more cost than SB3: below 1
    assert abs(lb.relative_score(-100.0, -150.0) - 4 / 3) < 1e-9  # 33 % less: above 1
    assert lb.relative_score(5.0, 0.0) is None


def test_learning_bench_caches_each_variant_under_its_settings(tmp_path):
    lb = load("learning")
    name, over = lb.parse_variant("nonorm:normalize_obs=false,agent.log_std_min=-20,agent.actor_hidden=[64,64]")
    assert (name, over) == ("nonorm", {"normalize_obs": False, "agent.log_std_min": -20,
                                       "agent.actor_hidden": (64, 64)})
    job = dict(task="Walker2d-v5", method="sac", seed=0, steps=15000, scale=1.0)
    plain = lb.job_path(tmp_path, job)
    a = lb.job_path(tmp_path, {**job, "variant": "x", "overrides": {"normalize_obs": False}})
    b = lb.job_path(tmp_path, {**job, "variant": "x", "overrides": {"normalize_obs": True}})
    assert plain.name == "Walker2d-v5__sac__s0__x1__15000.json"
    assert len({plain, a, b}) == 3  # same variant name, other settings: another file


def test_learning_bench_summarises_each_reward_scale_by_its_scores_and_its_ratios_to_scale_one(
        tmp_path, monkeypatch, capsys):
    import sys

    lb = load("learning")
    monkeypatch.setitem(sys.modules, lb.__name__, lb)  # the worker processes unpickle run_cached by name
    for scale, last in ((1.0, 200.0), (0.1, 300.0), (10.0, 150.0)):
        for seed in (0, 1):
            job = dict(task="Hopper-v5", method="dsac-t", seed=seed, steps=600, scale=scale)
            # five evaluations at `last`, then a final one at 100: the ratios of last5 and final differ
            curve = [[100 * i, last] for i in range(1, 6)] + [[600, 100.0 + 10 * scale]]
            path = lb.job_path(tmp_path, job)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**job, "curve": curve, "final": curve[-1][1], "wall_s": 1.0}))
    monkeypatch.setattr(sys, "argv", ["learning.py", "--tasks", "Hopper-v5", "--methods", "dsac-t", "--seeds", "0,1",
                                      "--steps", "600", "--reward-scales", "0.1,1,10", "--workers", "1",
                                      "--out", str(tmp_path), "--summary-only"])
    res = lb.main()["results"]
    assert res["Hopper-v5/dsac-t@reward_x0.1"]["n"] == 2
    # last5 of each: (4 x last + final) / 5
    assert res["Hopper-v5/dsac-t/reward_x0.1_relative_last5"] == round((1200 + 101) / (800 + 110), 3)
    assert res["Hopper-v5/dsac-t/reward_x10_relative_last5"] == round((600 + 200) / (800 + 110), 3)
    assert res["Hopper-v5/dsac-t/reward_x10_relative"] == round(200 / 110, 3)


def test_sim_overhead_replay_reproduces_the_recorded_run_without_physics():
    # bench/sim_overhead.py times env.step with each rollout call answered from a recording: the
    # replayed run must be the recorded one (same rewards, resets and observations)
    import torch

    from s2r.sim import BatchedEnv, EnvConfig

    so = load("sim_overhead")

    def run(pool_for):
        env = BatchedEnv(EnvConfig(task="humanoid-walk", num_envs=4, seed=0, episode_length_s=0.2))
        env.reset()
        real = env.backend._pool
        pool = env.backend._pool = pool_for(real)
        out = []
        for a in so._actions(env, 16):
            obs, rew, term, trunc, _ = env.step(a)
            out.append((obs["policy"], obs["critic"], rew, term | trunc))
        env.backend._pool = real
        env.close()
        return pool, out

    rec, recorded = run(so._RecordingPool)
    _, replayed = run(lambda real: so._ReplayPool(rec.outputs))
    assert len(rec.outputs) == 16 and any(done.any() for *_, done in recorded)  # resets happened
    for got, want in zip(replayed, recorded):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_sim_throughput_fraction_is_the_median_of_paired_windows_so_load_that_drifts_between_pairs_cancels():
    from s2r.bench_sim import fraction_of_ceiling, paired_windows

    # the true fraction is 0.8: each pair's replay takes 0.8 of its s2r window's time, under a load that
    # changes from pair to pair (x1, x3, x0.5); one burst slows the replay of one pair only
    load = iter([1.0, 3.0, 0.5, 2.0, 1.0])
    burst = iter([1.0, 1.0, 1.0, 4.0, 1.0])
    now = {}

    def s2r_window():
        now["load"] = next(load)
        return now["load"] * 1.0, ["calls"]

    pairs = paired_windows(s2r_window, lambda calls: now["load"] * 0.8 * next(burst), 5)
    assert len(pairs) == 5
    assert abs(fraction_of_ceiling(pairs) - 0.8) < 1e-12
    # the ratio of totals would take the burst in by its duration (and the unequal windows by their length)
    assert abs(sum(c for _, c in pairs) / sum(s for s, _ in pairs) - 0.8) > 0.1


def test_sim_throughput_replays_exactly_each_s2r_windows_rollout_calls(monkeypatch):
    import s2r.bench_sim as bs

    replayed = []
    real = bs._replay

    def spy(env, calls):
        replayed.append(list(calls))
        return real(env, calls)

    monkeypatch.setattr(bs, "_replay", spy)
    r = bs.s2r_vs_ceiling("humanoid-walk", None, 4, seconds=0.03, pairs=3)
    assert len(replayed) == 3 and all(len(calls) >= 3 for calls in replayed)  # at least 3 steps per window
    assert sum(len(calls) for calls in replayed) == r["env_steps"]  # each call once, in its own window's replay
    starts = [id(s0) for calls in replayed for s0, _ in calls]
    assert len(set(starts)) == len(starts)
    assert 0 < r["fraction"] and r["spread"][0] <= r["fraction"] <= r["spread"][1]


def test_learning_bench_variant_settings_reach_the_config_including_a_null_that_removes_a_recipe_value(monkeypatch):
    from s2r.policies.recipes import RECIPES

    lb = load("learning")
    monkeypatch.setitem(RECIPES, "Ant-v5", (dict(obs_norm_max_std=1.0, reward_norm=True, freeze_reward_norm=True), {}))
    _, over = lb.parse_variant("scale:obs_norm_max_std=null,agent.lr_actor=1e-3,reward_norm=false")
    job = dict(task="Ant-v5", method="dsac-t", seed=3, steps=30000, scale=0.1, variant="scale", overrides=over)
    cfg = lb.s2r_config(job)
    assert cfg.obs_norm_max_std is None  # the recipe caps it at 1; null takes the cap away
    assert (cfg.reward_norm, cfg.freeze_reward_norm) == (False, False)
    assert cfg.agent.lr_actor == 1e-3 and cfg.algo == "dsac-t" and cfg.seed == 3 and cfg.reward_scale == 0.1
    assert lb.s2r_config({**job, "overrides": {}}).obs_norm_max_std == 1.0


def test_learning_bench_sb3_n3_is_sb3_sac_with_its_three_step_replay(monkeypatch):
    import pytest

    stable_baselines3 = pytest.importorskip("stable_baselines3", reason="bench extra: pip install -e '.[bench]'")
    from stable_baselines3.common.buffers import NStepReplayBuffer

    lb = load("learning")
    made = []

    class Recorded(stable_baselines3.SAC):  # the real SAC; records what the bench built
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(stable_baselines3, "SAC", Recorded)
    res = lb.run_one(dict(task="Pendulum-v1", method="sb3-sac-n3", seed=0, steps=200, scale=1.0))
    assert len(res["curve"]) == 10 and made[0].n_steps == 3
    assert isinstance(made[0].replay_buffer, NStepReplayBuffer) and made[0].replay_buffer.n_steps == 3
    lb.run_one(dict(task="Pendulum-v1", method="sb3-sac", seed=0, steps=200, scale=1.0))
    assert made[1].n_steps == 1 and not isinstance(made[1].replay_buffer, NStepReplayBuffer)

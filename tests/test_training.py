"""Trainer operations: resumable runs after kill -9, NaN stops, safe checkpoints, spec mismatch,
data-parallel gradient averaging (2 gloo processes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from s2r.control.spec import RobotSpec
from s2r.policies.algorithms import AgentConfig, make_agent
from s2r.policies.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from s2r.policies.recipes import recipe
from s2r.policies.trainer import Trainer, TrainConfig, TrainingError, apply_settings, check_config, parse_setting

S2R = [sys.executable, "-m", "s2r.cli"]


def small(task="Pendulum-v1", algo="sac", policy="gaussian", **kw):
    base = dict(total_steps=600, learning_starts=200, batch_size=64, eval_every=10**9, eval_episodes=2,
                checkpoint_every=200, progress=False, log_every=100)
    base.update(kw)
    return recipe(task, algo, policy, **base)


@pytest.mark.parametrize("algo, policy", [("sac", "gaussian"), ("sac", "pmoe"), ("dsac-t", "gaussian"),
                                          ("dsac-t", "pmoe")])
def test_every_algorithm_and_head_trains_and_checkpoints(tmp_path, algo, policy):
    final = Trainer(small(algo=algo, policy=policy), tmp_path).train()
    assert set(final) >= {"return_mean", "env_steps"} and final["env_steps"] == 600
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert int(ck["env_steps"]) == 600 and ck["algo"] == algo and ck["policy"] == policy
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    assert (tmp_path / "eval.csv").read_text().startswith("env_steps") or "return_mean" in (tmp_path / "eval.csv").read_text()
    assert any((tmp_path / "tb").iterdir())


def test_s2r_task_trains_with_asymmetric_observations(tmp_path):
    cfg = small("humanoid-walk", num_envs=4, total_steps=160, learning_starts=80, batch_size=32,
                checkpoint_every=80, device="cpu", eval_episodes=1,
                env_overrides={"episode_length_s": 0.5})
    cfg.agent.bf16 = False
    tr = Trainer(cfg, tmp_path)
    assert tr.env.critic_obs_dim > tr.env.obs_dim
    tr.train()
    ck = load_checkpoint(latest_checkpoint(tmp_path), expected_spec_hash=tr.env.spec.hash())
    assert ck["spec_hash"] == tr.env.spec.hash()


def test_checkpoints_carry_the_robot_spec_itself(tmp_path):
    cfg = small("humanoid-walk", num_envs=2, total_steps=40, learning_starts=20, batch_size=16,
                checkpoint_every=40, eval_episodes=1, env_overrides={"episode_length_s": 0.2})
    cfg.agent.bf16 = False
    tr = Trainer(cfg, tmp_path / "walk")
    tr.train()
    ck = load_checkpoint(latest_checkpoint(tmp_path / "walk"))
    assert isinstance(ck["spec"], str) and json.loads(ck["spec"]) == tr.env.spec.to_dict()
    assert RobotSpec.from_dict(json.loads(ck["spec"])).hash() == ck["spec_hash"] == tr.env.spec.hash()
    assert ck["spec_source"] == tr.env.spec.source
    Trainer(small(total_steps=20, learning_starts=20, checkpoint_every=20, eval_episodes=1), tmp_path / "pend").train()
    ck = load_checkpoint(latest_checkpoint(tmp_path / "pend"))
    assert ck["spec"] is None and ck["spec_hash"] == ""  # a gymnasium task has no robot spec


def test_checkpoint_from_another_robot_spec_is_refused(tmp_path):
    cfg = small("humanoid-walk", num_envs=2, total_steps=40, learning_starts=20, batch_size=16,
                checkpoint_every=40, eval_episodes=1, env_overrides={"episode_length_s": 0.2})
    cfg.agent.bf16 = False
    Trainer(cfg, tmp_path).train()
    with pytest.raises(CheckpointError, match="robot spec|spec hash"):
        load_checkpoint(latest_checkpoint(tmp_path), expected_spec_hash="0000000000000000")


def test_init_from_starts_a_new_run_from_another_runs_weights_on_a_shifted_robot(tmp_path):
    """Further training of a policy (e.g. on a shifted robot): weights, Adam moments and normalisers come
    from the source run; steps, buffer and history start at zero; the policy acts from the first step."""
    kw = dict(num_envs=2, total_steps=40, learning_starts=20, batch_size=16, checkpoint_every=40, eval_episodes=1)
    src = small("humanoid-stand", env_overrides={"episode_length_s": 0.2}, **kw)
    src.agent.bf16 = False
    Trainer(src, tmp_path / "src").train()
    ck = load_checkpoint(latest_checkpoint(tmp_path / "src"))
    cfg = small("humanoid-stand", init_from=str(tmp_path / "src"), **kw,
                env_overrides={"episode_length_s": 0.2, "task_overrides": {"randomization": {"motor_strength": [0.8, 0.8]}}})
    cfg.agent.bf16 = False
    tr = Trainer(cfg, tmp_path / "dst")
    assert tr.env_steps == 0 and len(tr.buffer) == 0 and tr.eval_history == []
    for k, v in ck["agent"].items():
        assert torch.equal(tr.agent.state_dict()[k], v), k
    assert torch.equal(tr.obs_norm.state_dict()["mean"], ck["obs_norm"]["mean"])
    obs = tr.env.reset(seed=3)
    torch.manual_seed(0)
    a = tr._act(obs)  # the policy's sample, not the warm-up's uniform draw
    torch.manual_seed(0)
    assert torch.equal(a, tr.agent.act(tr._norm(obs)[0]))
    tr.train()
    assert int(load_checkpoint(latest_checkpoint(tmp_path / "dst"))["env_steps"]) == 40

    wrong = small("humanoid-stand", algo="dsac-t", init_from=str(tmp_path / "src"), **kw)
    with pytest.raises(TrainingError, match="trained as sac/gaussian, this run is dsac-t/gaussian"):
        Trainer(wrong, tmp_path / "dst2")
    with pytest.raises(TrainingError, match="no valid checkpoint"):
        Trainer(small("humanoid-stand", init_from=str(tmp_path / "none"), **kw), tmp_path / "dst3")
    with pytest.raises(CheckpointError, match="spec"):  # another robot: refused by the spec check
        Trainer(small("arm-reach", init_from=str(tmp_path / "src"), **kw), tmp_path / "dst4")


def test_nan_in_a_loss_stops_with_the_step_and_term_named(tmp_path):
    tr = Trainer(small(total_steps=1000), tmp_path)
    real = tr.agent.update
    calls = {"n": 0}

    def poisoned(batch):
        calls["n"] += 1
        stats = real(batch)
        if calls["n"] == 150:
            stats["critic_loss"] = torch.tensor(float("nan"))
        return stats

    tr.agent.update = poisoned
    want = r"non-finite critic_loss (at gradient update \d+|in gradient updates \d+-\d+) .*Last good checkpoint: .*ckpt_"
    with pytest.raises(TrainingError, match=want):
        tr.train()
    assert latest_checkpoint(tmp_path) is not None  # the last good checkpoint is kept


def test_kill_9_then_resume_loses_at_most_one_checkpoint_interval(tmp_path):
    run = tmp_path / "run"
    args = [*S2R, "train", "--task", "Pendulum-v1", "--steps", "3000", "--checkpoint-every", "500",
            "--eval-every", "100000", "--out", str(run), "--no-progress", "--checkpoint-buffer"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and latest_checkpoint(run) is None:
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)  # mid-run, possibly mid-write of the next checkpoint
    p.wait()
    ck = latest_checkpoint(run)
    assert ck is not None, "no checkpoint written before the kill"
    saved = load_checkpoint(ck)
    assert 500 <= int(saved["env_steps"]) < 3000 and len(saved["buffer"]["obs"]) > 0
    r = subprocess.run([*S2R, "train", "--resume", str(run), "--no-progress"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["env_steps"] == 3000
    steps = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("ckpt_*.pt"))
    assert steps[-1] == 3000 and all(b - a <= 500 for a, b in zip(steps, steps[1:]))


def test_a_wall_clock_budget_stops_training_and_evaluates_on_the_clock(tmp_path):
    tr = Trainer(small(total_steps=10**9, max_wall_s=3.0, eval_every_s=1.0), tmp_path)
    t0 = time.perf_counter()
    tr.train()
    assert time.perf_counter() - t0 < 3.0 + 20  # the clock stopped it (then one final evaluation and checkpoint)
    assert 0 < tr.env_steps < 10**9 and latest_checkpoint(tmp_path) is not None
    walls = [e["wall_s"] for e in tr.eval_history]
    assert len(walls) >= 2 and walls == sorted(walls)  # on the clock, not every 10**9 steps, then the final one


def test_freeze_obs_norm_keeps_the_warm_up_statistics_for_the_rest_of_the_run(tmp_path):
    tr = Trainer(small(total_steps=400, learning_starts=200, freeze_obs_norm=True), tmp_path)
    tr.train()
    assert tr.obs_norm.frozen and tr.critic_norm.frozen
    assert int(tr.obs_norm.count) == 200 and int(tr.critic_norm.count) == 200  # the random warm-up's only
    assert load_checkpoint(latest_checkpoint(tmp_path))["obs_norm"]["frozen"]  # a resumed run stays frozen


def test_wall_clock_settings_must_be_positive_seconds():
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="max_wall_s must be a number of seconds"):
            check_config(small(max_wall_s=bad))


def test_settings_from_a_command_line_are_typed_by_their_field_and_named_when_wrong():
    settings = dict(parse_setting(item) for item in ("obs_norm_max_std=3", "agent.lr_actor=1e-3",
                                                     "agent.critic_hidden=[64, 64]", "reward_norm=true",
                                                     "max_wall_s=null"))
    cfg = apply_settings(TrainConfig(), settings)
    assert cfg.obs_norm_max_std == 3.0 and isinstance(cfg.obs_norm_max_std, float)  # an int where a float goes
    assert cfg.agent.lr_actor == 1e-3 and cfg.agent.critic_hidden == (64, 64) and cfg.reward_norm is True
    assert cfg.max_wall_s is None
    for item, message in (("total_steps=1.5", "setting 'total_steps' takes int, got 1.5"),
                          ("normalize_obs=1", "setting 'normalize_obs' takes bool, got 1"),
                          ("num_envs=true", "setting 'num_envs' takes int, got True"),
                          ("obs_norm_max_std=three", "takes float | None, got 'three'"),
                          ("agent.lr_actr=1e-3", "AgentConfig has no field 'lr_actr'"),
                          ("obs_norm_max=3", "TrainConfig has no field 'obs_norm_max'"),
                          ("algo=dsac-t", "the algorithm is --algo")):
        with pytest.raises(ValueError, match=message.replace("|", r"\|").replace("(", r"\(")):
            apply_settings(TrainConfig(), dict([parse_setting(item)]))
    for item in ("obs_norm_max_std", "=3", "agent.critic_hidden=[64,"):
        with pytest.raises(ValueError, match="KEY=VALUE|not a number"):
            parse_setting(item)


def test_resume_refuses_a_directory_without_a_run(tmp_path):
    r = subprocess.run([*S2R, "train", "--resume", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no config.yaml" in r.stderr


def test_unknown_algorithm_and_head_are_named():
    r = subprocess.run([*S2R, "train", "--task", "Pendulum-v1", "--algo", "ppo"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown --algo 'ppo'" in r.stderr
    r = subprocess.run([*S2R, "train", "--task", "Pendulum-v1", "--policy", "moe"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown --policy 'moe'" in r.stderr
    r = subprocess.run([*S2R, "train", "--task", "NoSuchEnv-v9"], capture_output=True, text=True)
    assert r.returncode == 2 and "NoSuchEnv-v9" in r.stderr and "Traceback" not in r.stderr


def test_dsac_t_takes_the_huber_critic_loss_by_name_and_refuses_an_unknown_one():
    torch.manual_seed(0)
    batch = dict(obs=torch.randn(32, 3), critic_obs=torch.randn(32, 3), action=torch.rand(32, 1) * 2 - 1,
                 next_obs=torch.randn(32, 3), next_critic_obs=torch.randn(32, 3), reward=torch.randn(32),
                 done=torch.zeros(32), discount=torch.full((32,), 0.99))
    for name, weight in (("published", "omega"), ("huber", "rho")):
        agent = make_agent(AgentConfig(algo="dsac-t", dsac_critic=name, actor_hidden=(16,), critic_hidden=(16,)),
                           3, 3, 1)
        stats = agent.update(batch)
        assert weight in stats and torch.isfinite(stats["critic_loss"])
    with pytest.raises(ValueError, match="unknown DSAC-T critic loss 'l1'.*huber"):
        make_agent(AgentConfig(algo="dsac-t", dsac_critic="l1"), 3, 3, 1)


def test_eval_of_a_corrupt_checkpoint_is_refused(tmp_path):
    Trainer(small(total_steps=200, learning_starts=100, checkpoint_every=200), tmp_path).train()
    ck = latest_checkpoint(tmp_path)
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])
    r = subprocess.run([*S2R, "eval", str(ck)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "truncated or corrupt" in r.stderr


# ---- data parallel -------------------------------------------------------------------------

def _shards(B=8):
    g = torch.Generator().manual_seed(123)
    full = {k: torch.randn(2 * B, d, generator=g) for k, d in
            (("obs", 3), ("critic_obs", 3), ("action", 1), ("next_obs", 3), ("next_critic_obs", 3))}
    full.update(reward=torch.randn(2 * B, generator=g), done=torch.zeros(2 * B), discount=torch.full((2 * B,), 0.99))
    return [{k: v[r * B:(r + 1) * B] for k, v in full.items()} for r in range(2)]


def _dp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = AgentConfig(algo="sac", actor_hidden=(16,), critic_hidden=(16,), policy_delay=1000)
    agent = make_agent(cfg, 3, 3, 1)
    shard = _shards()[rank]
    torch.manual_seed(1)  # the same target-action noise on both ranks
    agent.update(shard)
    torch.save({k: v.detach().clone() for k, v in agent.critic.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_data_parallel_gradients_are_averaged_across_two_gloo_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k])  # identical after the averaged step
    # reference in one process: the mean of the two shards' gradients, applied by one Adam step
    torch.manual_seed(0)
    cfg = AgentConfig(algo="sac", actor_hidden=(16,), critic_hidden=(16,), policy_delay=1000)
    ref = make_agent(cfg, 3, 3, 1)
    init = {k: v.clone() for k, v in ref.critic.state_dict().items()}
    grads = []

    def capture(opt, loss, params):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append([p.grad.clone() for p in params])

    ref._step = capture
    for shard in _shards():
        torch.manual_seed(1)
        ref.update(shard)
    for p, g0, g1 in zip(ref.critic.parameters(), *grads):
        p.grad = (g0 + g1) / 2
    ref.critic_opt.step()
    for k, v in ref.critic.state_dict().items():
        torch.testing.assert_close(r0[k], v)
    # and a rank that had NOT averaged (its own shard's gradient) would differ
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0], grads[1]))
    assert any(not torch.allclose(r0[k], init[k]) for k in r0)


def test_eval_films_an_s2r_task_run(tmp_path):
    cfg = small("arm-reach", num_envs=2, total_steps=60, learning_starts=30, batch_size=16,
                checkpoint_every=60, eval_episodes=1, env_overrides={"episode_length_s": 0.3})
    Trainer(cfg, tmp_path).train()
    video = tmp_path / "reach.mp4"
    r = subprocess.run([*S2R, "eval", str(tmp_path), "--episodes", "2", "--video", str(video)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["episodes"] == 2 and out["length_mean"] == 15 and "success_rate" in out
    assert video.stat().st_size > 1000


def test_torchrun_trains_with_two_gloo_ranks(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "s2r.cli", "train",
                        "--task", "Pendulum-v1", "--num-envs", "2", "--steps", "600", "--checkpoint-every", "600",
                        "--out", str(tmp_path / "run"), "--no-progress"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert int(ck["env_steps"]) == 600  # global steps: 2 ranks x 1 env each


@pytest.mark.parametrize("algo, policy", [("sac", "gaussian"), ("dsac-t", "pmoe")])
def test_bf16_autocast_keeps_float32_outputs_and_updates(algo, policy):
    """bf16 autocast (the CUDA option; also fast on CPUs with AVX512-BF16/AMX) runs the hidden
    layers in bf16 but the output layers in float32: Q values and log-probs keep float32 resolution."""
    torch.manual_seed(0)
    cfg = AgentConfig(algo=algo, policy=policy, actor_hidden=(32, 32), critic_hidden=(32, 32), bf16=True)
    agent = make_agent(cfg, 5, 7, 2)
    obs, cobs, act = torch.randn(64, 5), torch.randn(64, 7), torch.rand(64, 2) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = agent.critic(cobs, act)
        q = q[0] if isinstance(q, tuple) else q
        a, logp = agent.actor.sample(obs)
    assert q.dtype == torch.float32 and logp.dtype == torch.float32
    q32 = agent.critic(cobs, act)
    q32 = q32[0] if isinstance(q32, tuple) else q32
    assert torch.allclose(q, q32, atol=0.05)  # bf16 hidden layers: close, not equal
    batch = dict(obs=obs, critic_obs=cobs, action=act, next_obs=obs.flip(0), next_critic_obs=cobs.flip(0),
                 reward=torch.randn(64), done=torch.zeros(64), discount=torch.full((64,), 0.99))
    before = [p.detach().clone() for p in agent.critic.parameters()]
    for _ in range(4):
        stats = agent.update(batch)
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert all(p.dtype == torch.float32 for p in agent.parameters())  # master weights stay float32
    assert any(not torch.equal(b, p) for b, p in zip(before, agent.critic.parameters()))


@pytest.mark.parametrize("algo", ["sac", "dsac-t"])
def test_policy_delay_counts_on_across_a_loaded_state(algo):
    """The actor updates every policy_delay critic updates, counted on the host (no GPU sync per update),
    and a state loaded from a checkpoint brings its own count: the delay's phase survives a resume."""
    cfg = AgentConfig(algo=algo, actor_hidden=(16,), critic_hidden=(16,), policy_delay=3)
    (batch, _) = _shards()
    agent = make_agent(cfg, 3, 3, 1)
    with_actor = ["actor_loss" in agent.update(batch) for _ in range(4)]
    assert with_actor == [False, False, True, False] and int(agent.n_updates) == 4
    resumed = make_agent(cfg, 3, 3, 1)
    resumed.update(batch)
    resumed.update(batch)  # its own count (2) is replaced by the loaded one (4)
    resumed.load_state_dict(agent.state_dict())
    assert ["actor_loss" in resumed.update(batch) for _ in range(3)] == [False, True, False]
    assert int(resumed.n_updates) == 7

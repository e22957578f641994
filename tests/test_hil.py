"""The correction learner (policies/hil.py), the scripted operator (sim/operator.py) and a simulated
correction session (s2r/hil_session.py), with real MuJoCo, torch and onnxruntime."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from s2r.control.operator import Arbiter, ArbiterConfig
from s2r.policies.hil import HILConfig, RLPDLearner, bc_update
from s2r.policies.replay import TransitionBuffer
from s2r.policies.trainer import Trainer

sys.path.insert(0, os.path.dirname(__file__))
from test_export import tiny  # noqa: E402


@pytest.fixture(scope="module")
def pick_run(tmp_path_factory):
    """A tiny arm-pick SAC run (a few seconds): the start of the learner and session tests."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("pick") / "run"
    cfg = tiny("arm-pick", "sac", "gaussian", num_envs=4, total_steps=400, learning_starts=200, batch_size=32)
    Trainer(cfg, d).train()
    return d


def _add_corrections(learner, n=256):
    """n corrected states around the normaliser's mean, all with the same operator action (reward 1,
    terminal): -> (obs [n, O], the operator's action [n, A])."""
    O, A = learner.obs_dim, learner.act_dim
    rng = np.random.default_rng(0)
    obs = (learner.obs_norm.mean.numpy() + rng.standard_normal((n, O)) * learner.obs_norm.var.sqrt().numpy()
           ).astype(np.float32)
    target = np.tile(np.array([[0.6, -0.4, 0.3, -0.8]], np.float32), (n, 1))[:, :A]
    learner.add(obs, target, np.ones(n, np.float32), obs, np.ones(n, np.float32), np.ones(n, bool))
    return obs, target


def test_transition_buffer_wraps_and_refuses_nan():
    buf = TransitionBuffer(5, obs_dim=2, act_dim=1)
    for k in range(3):  # 9 rows into 5 slots: the newest 5 (rewards 4..8) remain
        r = torch.arange(3 * k, 3 * k + 3, dtype=torch.float32)
        buf.add(obs=r[:, None].repeat(1, 2), action=torch.zeros(3, 1), reward=r, next_obs=torch.zeros(3, 2),
                done=torch.zeros(3))
    assert len(buf) == 5
    assert sorted(buf.reward.tolist()) == [4, 5, 6, 7, 8]
    b = buf.sample(64, torch.Generator().manual_seed(0))
    assert b["obs"].shape == (64, 2) and set(b["reward"].tolist()) <= {4, 5, 6, 7, 8}
    with pytest.raises(ValueError, match="NaN"):
        buf.add(obs=torch.full((1, 2), float("nan")), action=torch.zeros(1, 1), reward=torch.zeros(1),
                next_obs=torch.zeros(1, 2), done=torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        buf.add(obs=torch.zeros(1, 3), action=torch.zeros(1, 1), reward=torch.zeros(1), next_obs=torch.zeros(1, 2),
                done=torch.zeros(1))
    assert len(buf) == 5


def test_learner_batches_are_half_corrections(pick_run):
    learner = RLPDLearner.from_run(pick_run, HILConfig(batch_size=64, learning_starts=1))
    O, A = learner.obs_dim, learner.act_dim
    assert not learner.reused_critics  # the pretrained critics took privileged input: fresh ones
    k = 200
    intervened = np.zeros(k, bool)
    intervened[:20] = True
    reward = np.where(intervened, 1.0, 0.0).astype(np.float32)  # corrections marked by their reward
    learner.add(np.random.randn(k, O).astype(np.float32), np.zeros((k, A), np.float32), reward,
                np.random.randn(k, O).astype(np.float32), np.zeros(k, np.float32), intervened)
    assert len(learner.online) == 200 and len(learner.demo) == 20
    b = learner.sample()
    # 32 from the demonstration buffer (all reward 1), 32 online (10 % of which are corrections)
    assert b["obs"].shape == (64, O) and b["critic_obs"] is b["obs"]
    assert b["reward"][:32].min() == 1.0
    assert b["reward"][32:].mean() < 0.5
    assert torch.allclose(b["discount"], torch.full((64,), learner.agent.cfg.gamma))


def test_learner_follows_corrections_then_exports(pick_run, tmp_path):
    """With corrections only (demo_fraction 1), the actor moves toward the operator's actions; the
    exported ONNX is verified against torch and carries the run's robot spec."""
    from s2r.control.onnx_policy import OnnxPolicy

    cfg = HILConfig(batch_size=128, learning_starts=1, demo_fraction=1.0, critic_warmup=0, critic_actor_ratio=1,
                    init_alpha=1e-4, lr=1e-3)
    learner = RLPDLearner.from_run(pick_run, cfg)
    obs, target = _add_corrections(learner)  # the operator's action earns reward 1
    before = np.abs(learner.act(obs) - target).mean()
    bc = learner  # the same buffers drive the BC baseline
    bc_update(bc, 300)
    after_bc = np.abs(learner.act(obs) - target).mean()
    assert after_bc < 0.5 * before, (before, after_bc)
    learner.update(50)
    assert learner.n_updates == 350
    report = learner.export(tmp_path / "ft", tmp_path / "ft.onnx")
    assert report["max_abs_err_random"] <= 1e-4
    pol = OnnxPolicy(str(tmp_path / "ft.onnx"), expected_spec=learner.spec)
    np.testing.assert_allclose(pol(obs[:1]).reshape(-1), learner.act(obs[:1]).reshape(-1), atol=1e-4)
    # the saved directory is a run: it starts the next round of corrections
    again = RLPDLearner.from_run(tmp_path / "ft", HILConfig())
    np.testing.assert_allclose(again.act(obs[:4]), learner.act(obs[:4]), atol=1e-6)


def test_hil_config_errors():
    with pytest.raises(ValueError, match="demo_fraction"):
        HILConfig(demo_fraction=1.5).check()
    with pytest.raises(ValueError, match="init_alpha"):
        HILConfig(init_alpha=0.0).check()
    with pytest.raises(ValueError, match="batch_size"):
        HILConfig(batch_size=0).check()


def test_learner_from_missing_run(tmp_path):
    from s2r.policies.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        RLPDLearner.from_run(tmp_path)


def test_scripted_operator_picks_through_the_arbiter():
    """A policy that does nothing: the operator waits out its grace and patience, reacts after its
    delay, and its noisy gamepad, through the robot's Arbiter, lifts and places the cube."""
    from s2r.sim.gym import make_env
    from s2r.sim.operator import OperatorConfig, ScriptedPickOperator

    torch.set_num_threads(1)
    env = make_env("arm-pick", 4, seed=3)
    env.reset(seed=3)
    op = ScriptedPickOperator(env, OperatorConfig(seed=1))
    arbs = [Arbiter(ArbiterConfig.for_spec(env.spec, twist=None)) for _ in range(4)]
    zero = np.zeros(env.action_dim)
    ever = torch.zeros(4, dtype=torch.bool)
    first_act = np.full(4, -1)
    for step in range(400):
        acting = op.step()
        a = np.zeros((4, env.action_dim), np.float32)
        for i in range(4):
            arbs[i].update_joy(*op.joy(i, bool(acting[i])), step * env.control_dt)
            a[i], src, intervened = arbs[i].step(zero, step * env.control_dt)
            if intervened and first_act[i] < 0:
                first_act[i] = step
                assert src == "joy"
        _, _, term, trunc, info = env.step(torch.as_tensor(a))
        ever |= info["success"]
        if (term | trunc).any():
            break
    # no progress for the patience (1 s = 50 ticks, after the 0.5 s grace), then the reaction delay
    # (0.2-0.3 s = 10-15 ticks): the first takeover 61-66 ticks into the episode
    assert ((first_act >= 61) & (first_act <= 66)).all(), first_act
    assert ever.float().mean() >= 0.75, ever
    assert op.takeovers >= 4


@pytest.mark.parametrize("method", ["hil", "no-intervention", "hg-dagger"])
def test_session_runs_and_counts_interventions(pick_run, method):
    from s2r.hil_session import SessionConfig, run_session

    cfg = SessionConfig(method=method, minutes=0.15, num_envs=2, eval_every_min=0.1, eval_episodes=2,
                        hil=HILConfig(critic_warmup=10, learning_starts=64))
    r = run_session(pick_run, cfg)
    curve = r["curve"]
    assert [round(c["minutes"], 2) for c in curve] == [0.0, 0.1, 0.15]
    rates = [c["intervention_rate"] for c in curve[1:]]
    if method == "no-intervention":
        assert rates == [0.0, 0.0] and r["takeovers"] == 0
    else:  # 0.1 min = 300 ticks per env: the operator took over once the grace and patience ran out
        assert max(rates) > 0.0 and r["takeovers"] >= 1
    assert r["learner"].n_updates > 0


def test_q_filtered_bc_keeps_only_better_corrections():
    from s2r.policies.losses import q_filtered_bc_loss

    mean = torch.zeros(4, 2, requires_grad=True)
    demo_a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    demo = torch.tensor([True, True, True, False])
    q_demo = torch.tensor([2.0, 0.0, 2.0, 2.0])
    q_pi = torch.tensor([1.0, 1.0, 1.0, 1.0])
    loss, stats = q_filtered_bc_loss(mean, demo_a, demo, q_demo, q_pi)
    # rows 0 and 2: demonstrations the critic prefers; row 1 is worse than the policy; row 3 is online
    assert float(loss) == pytest.approx(2 / 3)
    assert float(stats["bc_kept"]) == pytest.approx(2 / 3)
    loss.backward()
    assert mean.grad[:, 0].tolist() == pytest.approx([-2 / 3, 0.0, -2 / 3, 0.0])


def test_bc_weight_pulls_the_rl_actor_toward_corrections(pick_run):
    """RLPD updates with bc_weight > 0 move the actor toward the operator's actions on the corrected
    states; with bc_weight 0 (pure RLPD, the same data and seed) they move it less."""
    gaps = {}
    for w in (0.0, 2.0):
        cfg = HILConfig(batch_size=128, learning_starts=1, critic_warmup=0, critic_actor_ratio=1, bc_weight=w, lr=1e-3)
        learner = RLPDLearner.from_run(pick_run, cfg)
        obs, target = _add_corrections(learner)
        before = np.abs(learner.act(obs) - target).mean()
        learner.update(150)
        gaps[w] = np.abs(learner.act(obs) - target).mean() / before
    assert gaps[2.0] < 0.6 and gaps[2.0] < gaps[0.0], gaps


def test_the_learner_keeps_the_actors_adam_moments_at_its_own_rate(pick_run):
    from s2r.policies.checkpoint import latest_checkpoint, load_checkpoint

    saved = load_checkpoint(latest_checkpoint(pick_run))["optim"]["actor"]
    learner = RLPDLearner.from_run(pick_run, HILConfig(lr=1e-5))
    got = learner.agent.actor_opt.state_dict()
    assert saved["state"] and set(got["state"]) == set(saved["state"])
    assert all(torch.equal(got["state"][i]["exp_avg"], st["exp_avg"]) for i, st in saved["state"].items())
    assert [g["lr"] for g in got["param_groups"]] == [1e-5]
    assert not learner.agent.critic_opt.state_dict()["state"]  # the critics start fresh on policy obs


def test_a_session_runs_on_a_shifted_robot(pick_run):
    """env_overrides reach the session's envs: 1 s episodes instead of arm-pick's 8 s end inside the budget."""
    from s2r.hil_session import SessionConfig, run_session

    def episodes(**over):
        cfg = SessionConfig(method="no-intervention", minutes=0.15, num_envs=2, eval_every_min=0.15,
                            eval_episodes=2, hil=HILConfig(critic_warmup=10, learning_starts=64), **over)
        return run_session(pick_run, cfg)["curve"][-1]["episodes"]

    assert episodes() == 0  # 225 ticks per env, 400 to an episode's end
    assert episodes(env_overrides={"episode_length_s": 1.0}) == 2 * 4  # 50 ticks each

"""The simulator as the world model's prior (world_models/sim_prior.py): the task's pose from a measured state,
the nominal simulator's step from it, and a diffusion model that learns only what the simulator misses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from s2r.world_models.data import collect_rollouts
from s2r.world_models.diffusion import (DiffusionWorldModel, WorldModelConfig, WorldModelError, load_world_model,
                                        save_world_model)
from s2r.world_models.sim_prior import (SimPrior, SimPriorConfig, sim_prior_extra, sim_prior_from_payload)
from s2r.world_models.train import FitConfig, diffusion_stepper, one_step_error, train_diffusion

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SHIFT = {"task_overrides": {"randomization": {"motor_strength": [0.8, 0.8], "mass_scale": [1.1, 1.1]}}}


def _nrmse(pred, true, ref):
    std = ref.std(0)
    used = std > 1e-6
    return (((pred - true) / std.clamp_min(1e-8))[:, used] ** 2).mean(-1).sqrt()


@pytest.fixture(scope="module")
def nominal():
    """Unrandomised humanoid-stand: 8 envs x 60 steps of random actions (a reset's noise, then falls)."""
    return collect_rollouts("humanoid-stand", None, num_envs=8, steps=60, noise=(0.0, 0.0), seed=0,
                            env_kwargs={"randomize": False})


@pytest.fixture(scope="module")
def sim(nominal):
    s = SimPrior(SimPriorConfig(num_envs=32), nominal.layout)
    yield s
    s.close()


def test_the_pose_from_a_measured_state_gives_the_state_back():
    from s2r.sim.env import BatchedEnv, EnvConfig

    env = BatchedEnv(EnvConfig(task="humanoid-stand", num_envs=16, seed=3))
    try:
        env.reset(seed=3)
        for _ in range(20):  # tilted, moving states: random actions, pushes and a reset's noise
            env.step(torch.rand(16, env.action_dim) * 2 - 1)
        t = env.task
        before = {k: v.clone() for k, v in (("g", t.gravity_b), ("h", t.height), ("q", t.q), ("qd", t.qd),
                                             ("w", t.ang_vel_b), ("v", t.lin_vel_b))}
        terms = {"projected_gravity": before["g"], "base_height": before["h"][:, None],
                 "joint_pos": before["q"] - t.qpos0[t.qpos_adr].float(), "joint_vel": before["qd"],
                 "base_ang_vel": before["w"], "base_lin_vel": before["v"]}
        qpos, qvel = t.pose_from_terms(terms)
        ids = torch.arange(16)
        env.backend.reset_envs(ids, qpos, qvel)
        t.refresh()
        for key, now in (("g", t.gravity_b), ("h", t.height), ("q", t.q), ("qd", t.qd), ("w", t.ang_vel_b),
                         ("v", t.lin_vel_b)):
            assert torch.allclose(now, before[key], atol=1e-5), key
        assert float(before["g"][:, :2].abs().max()) > 0.05  # the states were tilted, not upright
        assert torch.all(qpos[:, :2] == 0)  # at the origin
    finally:
        env.close()


def test_the_sim_prior_reproduces_an_unrandomised_step(nominal, sim):
    pred = sim.predict(nominal.state, nominal.action)
    err = _nrmse(pred, nominal.next_state, nominal.next_state)
    persistence = _nrmse(nominal.state, nominal.next_state, nominal.next_state)
    # measured: median 5e-4, mean 5e-3 (contacts re-solved from a cold start), against 0.6 for "no change"
    assert float(err.median()) < 0.01 and float(err.mean()) < 0.05 < float(persistence.mean())


def test_the_sim_prior_carries_the_command_and_the_physics_summary_over(nominal, sim):
    s = nominal.state[:10].clone()
    lay = nominal.layout
    at, dim = lay["velocity_command"]
    s[:, at:at + dim] = 0.37
    st = lay["critic.strength"][0]
    s[:, st] = 0.8
    nxt = sim.predict(s, nominal.action[:10])
    assert torch.all(nxt[:, at:at + dim] == 0.37) and torch.all(nxt[:, st] == 0.8)


def test_a_task_without_a_pose_from_terms_is_refused():
    arm = collect_rollouts("arm-reach", None, num_envs=2, steps=3, noise=(0.0, 0.0), seed=0)
    with pytest.raises(WorldModelError, match="pose_from_terms"):
        SimPrior(SimPriorConfig(task="arm-reach", num_envs=2), arm.layout)


def test_the_model_with_a_sim_prior_beats_the_simulator_and_the_plain_model(nominal, sim):
    """On the shifted robot with its randomisation (latency, pushes, physics) the nominal simulator is wrong by
    what the history can tell; a model that corrects it beats the simulator alone and the same model that
    predicts the whole step (measured: 0.28 against 0.37 and 0.48)."""
    from s2r.world_models.data import load_actor

    act = load_actor(ROOT / "policies/pretrained/g1_stand.onnx", nominal.spec)
    train = collect_rollouts("humanoid-stand", act, num_envs=16, steps=60, noise=(0.0, 0.3), seed=1, env_kwargs=SHIFT)
    held = collect_rollouts("humanoid-stand", act, num_envs=8, steps=60, noise=(0.0, 0.3), seed=2, env_kwargs=SHIFT)
    errs = {}
    for prior in (False, True):
        torch.manual_seed(0)
        m = DiffusionWorldModel(WorldModelConfig(train.state.shape[1], train.action.shape[1], width=128, blocks=2,
                                                 sim_prior=prior))
        train_diffusion(m, train.with_prior(sim) if prior else train, FitConfig(steps=400, batch_size=256, lr=2e-3))
        step = diffusion_stepper(m, 3, generator=torch.Generator().manual_seed(0), sim=sim if prior else None)
        errs[prior] = one_step_error(step, held, 2)["one_step_error"]
    sim_only = float(_nrmse(sim.predict(held.state, held.action), held.next_state, held.next_state).mean())
    assert errs[True] < errs[False] and errs[True] < sim_only, (errs, sim_only)


def test_a_sim_prior_model_needs_its_simulator_everywhere(nominal, sim, tmp_path):
    from s2r.world_models.imagined_env import ImaginedEnv, ImaginedEnvConfig

    S, A = nominal.state.shape[1], nominal.action.shape[1]
    cfg = WorldModelConfig(S, A, width=32, blocks=1, sim_prior=True)
    assert cfg.cond_dim == WorldModelConfig(S, A, width=32, blocks=1).cond_dim + S
    m = DiffusionWorldModel(cfg)
    with pytest.raises(ValueError, match="Transitions.with_prior"):
        train_diffusion(m, nominal, FitConfig(steps=2))
    data = nominal.with_prior(sim)
    train_diffusion(m, data, FitConfig(steps=20, batch_size=64))
    st = data.state[:4, None].expand(-1, 2, -1)
    ac = data.action[:4, None].expand(-1, 2, -1)
    with pytest.raises(WorldModelError, match="corrects a simulator"):
        m.predict(st, ac)
    plain = DiffusionWorldModel(WorldModelConfig(S, A, width=32, blocks=1))
    with pytest.raises(WorldModelError, match="without a sim prior"):
        plain.predict(st, ac, prior=data.prior[:4])
    # decode(target) gives the next state back around the simulator's state
    x0 = m.target(data.state, data.next_state, data.reward, data.terminated, data.prior)
    back, _, _ = m.decode(data.state, x0, data.prior)
    assert torch.allclose(back, data.next_state, atol=1e-4)
    # the imagined env: refused without the simulator, runs with it
    with pytest.raises(WorldModelError, match="needs its simulator"):
        ImaginedEnv(m, data, 4, ImaginedEnvConfig(samples=1))
    env = ImaginedEnv(m, data, 4, ImaginedEnvConfig(samples=2), sim=SimPrior(SimPriorConfig(num_envs=4),
                                                                                nominal.layout))
    env.reset(seed=0)
    obs, r, term, trunc, info = env.step(torch.zeros(4, A))
    assert obs["critic"].shape == (4, S) and torch.isfinite(r).all()
    # the file names its simulator; one without that entry is refused with a clear message
    path = tmp_path / "wm.pt"
    save_world_model(path, m, data.spec, {"layout": json.dumps(data.layout), **sim_prior_extra(sim.cfg)})
    m2, _, payload = load_world_model(path)
    assert m2.cfg.sim_prior and torch.equal(m2.prior_std, m.prior_std)
    rebuilt = sim_prior_from_payload(payload, data.layout, 8)
    assert rebuilt.cfg.task == "humanoid-stand" and rebuilt.env.num_envs == 8
    rebuilt.close()
    with pytest.raises(WorldModelError, match="does not say which"):
        sim_prior_from_payload({}, data.layout, 8)


def test_wm_train_with_a_sim_prior_then_eval(tmp_path):
    from typer.testing import CliRunner

    from s2r.cli import app

    run = tmp_path / "wm"
    r = CliRunner().invoke(app, ["wm", "train", "--out", str(run), "--task", "humanoid-stand", "--envs", "4",
                                 "--rollout-steps", "40", "--steps", "40", "--width", "64", "--blocks", "1",
                                 "--sim-prior", "--no-progress"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["transitions"] == 160 and summary["one_step_error"] < 1.0
    assert json.loads((run / "config.json").read_text())["sim_prior"] is True
    model, _, payload = load_world_model(run / "checkpoints/ckpt_000000040.pt")
    assert model.cfg.sim_prior and json.loads(payload["sim_prior"])["task"] == "humanoid-stand"
    r = CliRunner().invoke(app, ["wm", "eval", str(run), "--envs", "2", "--rollout-steps", "30", "--horizon", "5",
                                 "--samples", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.output.strip().splitlines()[-1])["h_step_error"]) == {"1", "5"}


@pytest.fixture(scope="module")
def shifted():
    """The same robot with 20 % weaker motors and 10 % more mass, nothing else randomised: random actions."""
    from s2r.sim.randomization import fixed_shift_overrides

    over = fixed_shift_overrides({"motor_strength": 0.8, "mass_scale": 1.1})
    return collect_rollouts("humanoid-stand", None, num_envs=8, steps=60, noise=(0.0, 0.0), seed=4,
                            env_kwargs={"task_overrides": over})


def test_the_sim_prior_steps_a_robot_with_other_physics(shifted, sim):
    from s2r.world_models.identify import identify_physics

    def err(physics):
        sim.set_physics(physics)
        return float(_nrmse(sim.predict(shifted.state, shifted.action), shifted.next_state, shifted.next_state).mean())

    nominal_err, right_err = err({}), err({"motor_strength": 0.8, "mass_scale": 1.1})
    assert right_err < 0.05 < nominal_err, (right_err, nominal_err)  # the shifted robot, stepped as it is
    assert err({}) == nominal_err and sim.physics == {}  # {} restores the nominal model
    # identified from the data by the simulator's one-step error. Motor torque and mass trade off (PD torque
    # against inertia and gravity load), a valley that the pattern search follows (measured: 0.797, 1.094)
    res = identify_physics(sim, shifted, fields=("motor_strength", "mass_scale"), grid=5, max_rows=256)
    try:
        assert abs(res.value["motor_strength"] - 0.8) < 0.03 and abs(res.value["mass_scale"] - 1.1) < 0.03, res
        assert res.error < 0.2 * res.error_start and res.on_edge == [] and sim.physics == res.value
    finally:
        sim.set_physics({})
    with pytest.raises(WorldModelError, match="unknown scale 'strength'"):
        sim.set_physics({"strength": 0.8})
    with pytest.raises(WorldModelError, match="motor_strength must be a finite number > 0"):
        sim.set_physics({"motor_strength": float("nan")})
    with pytest.raises(ValueError, match="grid >= 3"):
        identify_physics(sim, shifted, grid=2)
    with pytest.raises(WorldModelError, match="no transitions"):
        identify_physics(sim, shifted.select(torch.zeros(0, dtype=torch.long)))


def test_a_randomised_sim_prior_steps_one_robot_of_the_family_per_env(nominal):
    """Imagination's simulator (randomize): per env one robot of the task's domain randomisation, centred on
    the physics set, and the task's pushes; new robots where rollouts restart."""
    from s2r.world_models.imagined_env import ImaginedEnv, ImaginedEnvConfig

    pushes = {"task_overrides": {"randomization": {"push_interval_s": [0.02, 0.02]}}}  # a push every control step
    n = 16
    sim = SimPrior(SimPriorConfig(num_envs=n), nominal.layout, randomize=True)
    calm = SimPrior(SimPriorConfig(num_envs=n), nominal.layout)
    kicked = SimPrior(SimPriorConfig(num_envs=n, **pushes), nominal.layout, randomize=True)
    still = SimPrior(SimPriorConfig(num_envs=n, task_overrides={"randomization": {"push_velocity": 0.0}}),
                     nominal.layout, randomize=True)  # the same robots (same seed), no pushes
    try:
        lo, hi = sim.env.randomizer.cfg.motor_strength
        sim.set_physics({"motor_strength": 0.8})
        assert sim.env.randomizer.cfg.motor_strength == pytest.approx((0.8 * lo, 0.8 * hi))
        strength = sim.env.dr_summary["strength"].clone()  # [n] each env's mean motor strength
        assert len(set(strength.tolist())) == n and (strength > 0.8 * lo - 1e-6).all() and (strength < 0.8 * hi).all()
        assert (sim.env.latency == 0).all()  # latency is the residual's, not the simulator's
        # one state and action for every env: the robots step it differently, around the fixed robot's step
        s, a = nominal.state[:1].expand(n, -1), nominal.action[:1].expand(n, -1)
        calm.set_physics({"motor_strength": 0.8})
        fixed = calm.predict(s, a)
        nxt = sim.predict(s, a)
        spread = (nxt - nxt.mean(0)).abs().amax(0)  # [S]
        assert spread.max() > 1e-3 and (nxt - fixed).abs().max() < 0.5
        sim.reset_envs(torch.tensor([0, 3]))  # new robots there only
        moved = sim.env.dr_summary["strength"] != strength
        assert moved.tolist() == [i in (0, 3) for i in range(n)]
        # pushes: the base's velocity jumps by up to push_velocity in x and y, as in training
        v_at, _ = nominal.layout["critic.base_lin_vel"]
        scale = {t.name: t.scale for t in kicked.env.spec.observation.terms}.get("critic.base_lin_vel", 1.0)
        diff = kicked.predict(s, a) - still.predict(s, a)  # [n, S]
        dv = diff[:, v_at:v_at + 2] / scale  # [n, 2] m/s
        assert kicked.env.rand_cfg.push_velocity == 0.3 and dv.abs().max() > 0.2 and (dv.abs() <= 0.3 + 1e-6).all()
        assert (diff[:, :v_at] == 0).all() and (diff[:, v_at + 2:] == 0).all()  # the kick alone
        with pytest.raises(WorldModelError, match="one row per env"):
            sim.predict(s[:4], a[:4])
        model = DiffusionWorldModel(WorldModelConfig(state_dim=nominal.state.shape[1],
                                                     action_dim=nominal.action.shape[1], history=1, width=32,
                                                     blocks=1, sim_prior=True))
        with pytest.raises(WorldModelError, match="one MuJoCo env per imagined env"):
            ImaginedEnv(model, nominal, n // 2, ImaginedEnvConfig(), sim=sim)
    finally:
        for x in (sim, calm, kicked, still):
            x.close()

"""Batched env API: shapes, auto-reset and final observations, seeds, randomisation, bad input."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from s2r.control.spec import SpecError
from s2r.sim import BatchedEnv, EnvConfig, EnvError
from s2r.sim.model import ModelError
from s2r.sim.tasks import UnknownTaskError

GYM_HUMANOID = "gym_humanoid/humanoid.yaml"


def make(task="humanoid-walk", **kw):
    return BatchedEnv(EnvConfig(task=task, **kw))


def zeros(env):
    return torch.zeros(env.num_envs, env.action_dim)


def test_step_returns_batched_tensors_of_the_documented_shapes():
    env = make(num_envs=3)
    obs = env.reset()
    assert obs["policy"].shape == (3, env.obs_dim) and obs["critic"].shape == (3, env.critic_obs_dim)
    assert env.obs_dim == env.spec.observation.dim
    obs, rew, term, trunc, info = env.step(zeros(env))
    assert rew.shape == (3,) and rew.dtype == torch.float32
    assert term.dtype == torch.bool and trunc.dtype == torch.bool
    assert set(info["log"]["reward_terms"]) == {k for k, w in env.reward_weights.items() if w}


def test_g1_holds_its_default_pose_on_pd_servos_before_balance_is_needed():
    # kp 20 ankles cannot hold a 33 kg inverted pendulum (m g h ~ 223 N m/rad): after ~0.5 s it
    # tips slowly, which is the policy's job to prevent. Before that the pose must be held.
    env = make(num_envs=2, randomize=False, task_overrides={"init_joint_noise": 0.0})
    env.reset()
    h0 = env.task.height.clone()
    for _ in range(25):  # 0.5 s at 50 Hz
        _, _, term, _, _ = env.step(zeros(env))
        assert not term.any()
    assert (env.task.height - h0).abs().max() < 0.03
    assert env.task.contact.all()  # both feet on the floor


def test_time_limit_truncates_without_terminating_and_returns_final_obs():
    env = make(num_envs=2, randomize=False, episode_length_s=0.2)  # 10 control steps
    ref = make(num_envs=2, randomize=False, episode_length_s=10.0)
    env.reset(seed=3)
    ref.reset(seed=3)
    for k in range(10):
        obs, _, term, trunc, info = env.step(zeros(env))
        robs, *_ = ref.step(zeros(ref))
        if k < 9:
            assert not trunc.any()
    assert trunc.all() and not term.any()
    # the final observation is what the episode ended in; the returned one starts the next episode
    torch.testing.assert_close(info["final_obs"]["policy"], robs["policy"])
    torch.testing.assert_close(info["final_obs"]["critic"], ref._obs["critic"])
    assert not torch.allclose(obs["policy"], robs["policy"])
    assert info["episode"]["length"].tolist() == [10, 10]
    assert (env.episode_step == 0).all()


def test_step_leaves_the_callers_action_as_it_was_when_envs_reset():
    """A trainer stores the action it passed after env.step: the env must not zero the rows that reset."""
    env = make(num_envs=3, seed=0, episode_length_s=0.02)  # one control step: every env truncates
    env.reset()
    a = torch.full((3, env.action_dim), 0.5)
    _, _, term, trunc, _ = env.step(a)
    assert bool((term | trunc).all())
    assert torch.equal(a, torch.full((3, env.action_dim), 0.5))


def test_a_fall_terminates_only_that_env_and_resets_it():
    env = make(num_envs=3, randomize=False)
    env.reset()
    for _ in range(3):
        env.step(zeros(env))
    qpos = env.backend.qpos
    qpos[1, env.index.base_qpos + 2] = 0.2  # env 1's pelvis on the floor
    _, _, term, trunc, info = env.step(zeros(env))
    assert term.tolist() == [False, True, False] and not trunc.any()
    assert info["episode"]["env_ids"].tolist() == [1]
    assert env.episode_step.tolist() == [4, 0, 4]
    assert info["final_obs"]["critic"][1, env.spec.observation.frame_dim + 3] < 0.5  # base height term


def test_reset_envs_starts_new_episodes_and_robots_in_those_envs_only():
    env = make(num_envs=4, seed=2)
    env.reset()
    for _ in range(3):
        env.step(zeros(env))
    friction = [env.backend.env_model(i).geom_friction[0, 0] for i in range(4)]
    env.reset_envs(torch.tensor([2]))
    assert env.episode_step.tolist() == [3, 3, 0, 3]
    now = [env.backend.env_model(i).geom_friction[0, 0] for i in range(4)]
    assert [a != b for a, b in zip(friction, now)] == [False, False, True, False]  # a new robot in env 2 only
    env.reset_envs(torch.zeros(0, dtype=torch.long))  # nothing to reset
    with pytest.raises(EnvError, match=r"env ids must lie in \[0, 4\)"):
        env.reset_envs(torch.tensor([4]))


def test_same_seed_same_rollout_and_other_seed_differs():
    def rollout(seed):
        env = make(num_envs=4, seed=seed)
        out = [env.reset()["policy"]]
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            out.append(env.step(torch.rand(4, env.action_dim, generator=g) * 2 - 1)[0]["policy"])
        return torch.stack(out)

    a, b, c = rollout(7), rollout(7), rollout(8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_domain_randomisation_stays_within_configured_ranges_and_differs_per_env():
    env = make(num_envs=8, seed=1)
    env.reset()
    rc = env.rand_cfg
    nom = env.randomizer.nominal
    fr, mass = [], []
    for i in range(8):
        m = env.backend.env_model(i)
        ratio = m.geom_friction[:, 0] / nom["geom_friction"][:, 0]
        assert rc.friction[0] - 1e-9 <= ratio.min() and ratio.max() <= rc.friction[1] + 1e-9
        mr = m.body_mass[1:] / nom["body_mass"][1:]
        assert rc.mass_scale[0] - 1e-9 <= mr.min() and mr.max() <= rc.mass_scale[1] + 1e-9
        kp = m.actuator_gainprm[env.index.joint_act, 0] / nom["actuator_gainprm"][env.index.joint_act, 0]
        lo = rc.kp_scale[0] * rc.motor_strength[0]
        hi = rc.kp_scale[1] * rc.motor_strength[1]
        assert lo - 1e-9 <= kp.min() and kp.max() <= hi + 1e-9
        fr.append(ratio[0])
        mass.append(mr[0])
    assert len(set(np.round(fr, 6))) == 8 and len(set(np.round(mass, 6))) == 8
    assert env.latency.min() >= rc.latency_steps[0] and env.latency.max() <= rc.latency_steps[1]


def test_randomisation_draws_once_the_numbers_of_one_draw_per_term():
    # a reset pays per torch op: the randomiser draws all its terms at once, from the same random stream
    from s2r.sim.randomization import _uniform

    draws = [(0.5, 1.25, (3, 1)), (0.9, 1.1, (3, 17)), (-0.02, 0.02, (3, 3))]
    gen = torch.Generator().manual_seed(4)
    each = [lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64).numpy() for lo, hi, shape in draws]
    gen.manual_seed(4)
    for got, want in zip(_uniform(gen, draws), each):
        assert got.shape == want.shape and np.array_equal(got, want)


def test_randomisation_off_keeps_the_nominal_model():
    env = make(num_envs=2, randomize=False)
    env.reset()
    assert env.backend.env_model(1) is env.model


def test_a_fixed_model_shift_is_one_deterministic_robot():
    """The ROS sim bridge's shifted robot: the given scales exactly, every other term nominal, at every reset."""
    from s2r.sim.randomization import fixed_shift_overrides, parse_model_shift

    shift = parse_model_shift("motor_strength=0.8, randomization.mass_scale=1.1")
    assert shift == {"motor_strength": 0.8, "mass_scale": 1.1}
    env = make(num_envs=2, randomize=True, seed=3, task_overrides=fixed_shift_overrides(shift))
    nom = env.randomizer.nominal
    act = env.index.joint_act
    for _ in range(2):
        env.reset()
        for i in range(2):
            m = env.backend.env_model(i)
            np.testing.assert_allclose(m.actuator_forcerange[act], 0.8 * nom["actuator_forcerange"][act])
            np.testing.assert_allclose(m.actuator_gainprm[act, 0], 0.8 * nom["actuator_gainprm"][act, 0])
            np.testing.assert_allclose(m.body_mass[1:], 1.1 * nom["body_mass"][1:])
            np.testing.assert_allclose(m.geom_friction, nom["geom_friction"])
            np.testing.assert_allclose(m.body_ipos, nom["body_ipos"])
            np.testing.assert_allclose(m.dof_frictionloss, nom["dof_frictionloss"])
    assert env.latency.max() == 0 and env.rand_cfg.push_velocity == 0.0
    for bad, message in (("motor_strength", "expected FIELD=SCALE"), ("strength=0.8", "expected FIELD=SCALE"),
                         ("mass_scale=heavy", "not a number"), ("friction=-1", "finite number > 0")):
        with pytest.raises(ValueError, match=message):
            parse_model_shift(bad)


def test_pushes_kick_the_base_velocity():
    env = make(num_envs=2, randomize=True, seed=0)
    env.rand_cfg = dataclasses.replace(env.rand_cfg, push_velocity=1.0, push_interval_s=(0.02, 0.02),
                                       obs_noise={})
    env.reset()
    env.step(zeros(env))
    v = env.backend.qvel[:, env.index.base_dof:env.index.base_dof + 2].clone()
    env.step(zeros(env))
    v2 = env.backend.qvel[:, env.index.base_dof:env.index.base_dof + 2]
    assert (v2 - v).abs().max() > 0.2


def test_diverged_env_is_reset_counted_and_does_not_poison_the_batch():
    env = make("mjcf-locomotion", spec=GYM_HUMANOID, num_envs=3)
    env.reset()
    env.step(zeros(env))
    env.backend.qvel[2, 0] = float("nan")
    obs, rew, term, trunc, info = env.step(zeros(env))
    assert info["diverged"].tolist() == [False, False, True]
    assert term[2] and env.diverged_total == 1 and info["diverged_total"] == 1
    assert torch.isfinite(obs["policy"]).all() and torch.isfinite(rew).all()
    assert torch.isfinite(info["final_obs"]["policy"]).all()
    assert env.episode_step.tolist() == [2, 2, 0]
    obs, *_ = env.step(zeros(env))
    assert torch.isfinite(obs["policy"]).all()


def test_mujoco_own_instability_reset_is_detected():
    env = make("mjcf-locomotion", spec=GYM_HUMANOID, num_envs=2, max_qvel=1e12)
    env.reset()
    env.backend.qvel[0, 6:] = 1e9  # MuJoCo's mj_checkVel/Acc resets the data mid-rollout
    _, _, term, _, info = env.step(zeros(env))
    assert info["diverged"][0] and not info["diverged"][1]


@pytest.mark.parametrize("task,spec", [("humanoid-walk", None), ("mjcf-locomotion", GYM_HUMANOID)])
def test_reset_leaves_the_state_and_sensors_of_mujocos_own_reset(task, spec):
    # the backend writes the reset rows in one batch (and skips mj_forward without sensors): each env
    # must hold what mj_resetData + new qpos/qvel + mj_forward give on its own randomised model
    import mujoco

    env = make(task, spec=spec, num_envs=4)
    env.reset(seed=1)
    for _ in range(3):
        env.step(torch.rand(4, env.action_dim) * 2 - 1)
    be, ids = env.backend, torch.tensor([0, 2])
    qpos, qvel = env.task.reset(ids)
    be.reset_envs(ids, qpos, qvel)
    models = [copy.copy(be.env_model(i)) for i in ids.tolist()]  # the models they were reset on
    params, _ = env.randomizer.sample(2, env.gen)
    be.set_params(ids, params)  # sensors are computed lazily: a new model must not change them
    d = mujoco.MjData(env.model)
    state = np.zeros(be.nstate)
    for k, i in enumerate(ids.tolist()):
        m = models[k]
        mujoco.mj_resetData(m, d)
        d.qpos[:], d.qvel[:] = qpos[k].numpy(), qvel[k].numpy()
        mujoco.mj_forward(m, d)
        mujoco.mj_getState(m, d, state, mujoco.mjtState.mjSTATE_FULLPHYSICS)
        assert np.array_equal(be.state[i], state)
        assert np.array_equal(be.sensordata[i].numpy(), d.sensordata)


def test_gymnasium_humanoid_model_runs_through_a_spec_file():
    env = make("mjcf-locomotion", spec=GYM_HUMANOID, num_envs=4)
    assert env.model.nu == 17 and env.action_dim == 17 and env.decimation == 5
    env.reset()
    g = torch.Generator().manual_seed(0)
    done = 0
    for _ in range(60):
        _, _, term, trunc, _ = env.step(torch.rand(4, 17, generator=g) * 2 - 1)
        done += int((term | trunc).sum())
    assert done > 0  # random torques make it fall: terminations happen and reset


# ---- bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_num_envs_is_refused(n):
    with pytest.raises(EnvError, match="num_envs must be a positive integer"):
        make(num_envs=n)


def test_unknown_task_and_backend_are_named():
    with pytest.raises(UnknownTaskError, match="unknown task 'humanoid-fly'.*humanoid-walk"):
        make("humanoid-fly")
    with pytest.raises(EnvError, match="unknown backend 'isaac'"):
        make(backend="isaac")


def test_wrong_action_shape_and_nan_are_refused():
    env = make(num_envs=2)
    env.reset()
    with pytest.raises(EnvError, match=r"action has shape \(2, 3\), expected \[num_envs=2, action_dim=13\]"):
        env.step(torch.zeros(2, 3))
    a = zeros(env)
    a[1, 4] = float("nan")
    with pytest.raises(EnvError, match=r"NaN/Inf in env\(s\) \[1\]"):
        env.step(a)


def test_step_before_reset_is_refused():
    env = make(num_envs=1)
    with pytest.raises(EnvError, match="call reset"):
        env.step(zeros(env))


def _spec_with_mjcf(tmp_path, xml, joint="hinge"):
    (tmp_path / "robot.xml").write_text(xml)
    spec = tmp_path / "robot.yaml"
    spec.write_text(f"""name: broken
mjcf: robot.xml
base_body: torso
physics_dt: 0.005
decimation: 2
action: {{type: joint_torque, scale: 1.0}}
joints:
  - {{name: {joint}, range: [-1, 1]}}
observation:
  terms:
    - {{name: joint_pos, dim: 1}}
""")
    return str(spec)


def test_malformed_mjcf_is_reported_with_its_path(tmp_path):
    spec = _spec_with_mjcf(tmp_path, "<mujoco><worldbody><body><geom size='0.1'/></body>")
    with pytest.raises(ModelError, match="malformed MJCF .*robot.xml"):
        make("mjcf-locomotion", spec=spec, num_envs=1)


def test_spec_joint_missing_from_mjcf_is_named(tmp_path):
    xml = ("<mujoco><worldbody><body name='torso'><freejoint/><geom size='0.1'/>"
           "<body><joint name='other'/><geom size='0.1'/></body></body></worldbody>"
           "<actuator><motor joint='other'/></actuator></mujoco>")
    spec = _spec_with_mjcf(tmp_path, xml)
    with pytest.raises(ModelError, match=r"joint\(s\) \['hinge'\] not found"):
        make("mjcf-locomotion", spec=spec, num_envs=1)


def test_joint_without_actuator_is_named(tmp_path):
    xml = ("<mujoco><worldbody><body name='torso'><freejoint/><geom size='0.1'/>"
           "<body><joint name='hinge'/><geom size='0.1'/></body></body></worldbody></mujoco>")
    spec = _spec_with_mjcf(tmp_path, xml)
    with pytest.raises(ModelError, match=r"no actuator drives joint\(s\) \['hinge'\]"):
        make("mjcf-locomotion", spec=spec, num_envs=1)


def test_missing_spec_file_is_named():
    with pytest.raises(SpecError, match="not found"):
        make("humanoid-walk", spec="/nonexistent/robot.yaml")


def test_spec_range_wider_than_the_mjcf_is_reported():
    from s2r.sim.model import check_spec_against_model

    env = make(num_envs=1)
    assert check_spec_against_model(env.spec, env.model) == []
    env.spec.joints[3].range = (-1.0, 3.5)  # left knee: MJCF allows [-0.0873, 2.8798]
    (warning,) = check_spec_against_model(env.spec, env.model)
    assert "left_knee_joint" in warning and "exceeds MJCF range" in warning

"""Tasks: the arm's IK and grasp really work in MuJoCo; the humanoid's sensors and terms are sane."""

import mujoco
import numpy as np
import pytest
import torch

from s2r.control.ik import hinge_jacobian
from s2r.sim import BatchedEnv, EnvConfig


def make(task, **kw):
    return BatchedEnv(EnvConfig(task=task, **kw))


def test_kinematic_jacobian_equals_mj_jacsite_on_the_panda():
    """The IK's Jacobian (control/kinematics.py FK + control/ik.py) is MuJoCo's own, for the task's states."""
    env = make("arm-reach", num_envs=3, randomize=False, seed=4)
    env.reset()
    env.step(torch.tensor([[1.0, -1.0, 0.5, 1.0]] * 3))  # move off the start pose
    t, m = env.task, env.model
    d = mujoco.MjData(m)
    site = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, env.spec.action.ee_site)
    for i in range(3):
        d.qpos[:] = env.backend.qpos[i].numpy()
        mujoco.mj_forward(m, d)
        jp, jr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        mujoco.mj_jacSite(m, d, jp, jr, site)
        J = hinge_jacobian(t.anchors64[i:i + 1], t.axes64[i:i + 1], t.ee_pos64[i:i + 1])[0].numpy()
        np.testing.assert_allclose(t.ee_pos64[i].numpy(), d.site_xpos[site], atol=1e-12)
        np.testing.assert_allclose(J[:3], jp[:, t.dof_adr.numpy()], atol=1e-9)
        np.testing.assert_allclose(J[3:], jr[:, t.dof_adr.numpy()], atol=1e-9)


def test_scripted_reach_through_ik_reaches_every_target():
    env = make("arm-reach", num_envs=4, randomize=False, seed=1)
    env.reset()
    for _ in range(env.max_episode_steps - 1):
        _, _, term, trunc, info = env.step(env.task.scripted_action())
    assert info["success"].all(), (env.task.ee_pos() - env.task.target).norm(dim=1)


def test_ee_delta_action_moves_the_end_effector_by_scale():
    env = make("arm-reach", num_envs=1, randomize=False)
    env.reset()
    for _ in range(5):
        env.step(torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    p0 = env.task.ee_pos().clone()
    for _ in range(10):
        env.step(torch.tensor([[0.0, 1.0, 0.0, 1.0]]))  # +y at 0.02 m per step
    for _ in range(10):
        env.step(torch.tensor([[0.0, 0.0, 0.0, 1.0]]))  # settle
    d = env.task.ee_pos() - p0
    assert d[0, 1].item() == pytest.approx(0.2, abs=0.02)
    assert abs(d[0, 0].item()) < 0.03 and abs(d[0, 2].item()) < 0.03  # delta control: small drift


def test_scripted_pick_and_place_lifts_the_cube_to_the_target():
    env = make("arm-pick", num_envs=4, randomize=False, seed=2)
    env.reset()
    rest = env.task.cube_rest_z
    lifted = torch.zeros(4, dtype=torch.bool)
    for _ in range(env.max_episode_steps - 1):
        _, _, term, _, info = env.step(env.task.scripted_action())
        assert not term.any()
        lifted |= env.task.cube_pos()[:, 2] > rest + 0.03
    # the script ignores the cube's yaw, so a corner-on grasp can slip: most, not all, succeed
    assert lifted.float().mean() >= 0.75 and info["success"].float().mean() >= 0.75


def test_arm_gripper_command_opens_and_closes():
    env = make("arm-reach", num_envs=2, randomize=False)
    env.reset()
    for _ in range(20):
        env.step(torch.tensor([[0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 1.0]]))
    g = env.task.gripper_opening()[:, 0]
    assert g[0] < 0.005 and g[1] > 0.035


def test_humanoid_observation_follows_the_spec_layout():
    env = make("humanoid-walk", num_envs=2, randomize=False)
    obs = env.reset()
    terms = env.policy_obs.terms(env.task.robot_state())
    assert [t.name for t in env.spec.observation.terms] == list(terms)
    start = 0
    for t in env.spec.observation.terms:
        np.testing.assert_allclose(obs["policy"][:, start:start + t.dim].numpy(),
                                   (terms[t.name] * t.scale).clamp(-t.clip, t.clip).numpy(), atol=1e-6)
        start += t.dim
    g = terms["projected_gravity"]
    assert torch.allclose(g[:, 2], torch.full((2,), -1.0), atol=0.05)  # upright at reset


def test_humanoid_commands_are_resampled_within_ranges():
    env = make("humanoid-walk", num_envs=64, seed=3)
    env.reset()
    c, cfg = env.task.command, env.task.cfg
    assert (c[:, 0] >= cfg.command_vx[0]).all() and (c[:, 0] <= cfg.command_vx[1]).all()
    assert (c[:, 2].abs() <= max(abs(x) for x in cfg.command_yaw)).all()
    assert (c.abs().sum(1) == 0).any()  # some standing commands


def test_a_new_episode_resamples_its_command_resample_steps_after_its_start():
    """Not after the finished episode's length plus resample_steps (episode_step still held it in task.reset)."""
    env = make("humanoid-walk", num_envs=2, seed=0)
    env.reset(seed=0)
    task = env.task
    for _ in range(7):
        env.step(torch.zeros(2, env.action_dim))
    assert (env.episode_step == 7).all()
    env._reset_envs(torch.tensor([1]))
    assert env.episode_step.tolist() == [7, 0]
    assert task.next_resample[1] == task.resample_steps
    assert task.next_resample[0] == task.resample_steps  # env 0 kept its first episode's schedule


def test_feet_contact_and_air_time_come_from_touch_sensors():
    env = make("humanoid-walk", num_envs=1, randomize=False)
    env.reset()
    env.step(torch.zeros(1, 13))
    assert env.task.contact.all()
    env.backend.qpos[0, env.index.base_qpos + 2] += 0.3  # lift the robot off the floor
    env.backend.qvel[0] = 0
    env.step(torch.zeros(1, 13))
    assert not env.task.contact.any()
    assert (env.task.air_time > 0).all()


def test_unknown_observation_term_for_the_generic_task_is_named(tmp_path):
    import yaml

    from s2r.sim.tasks import ROBOTS_DIR

    d = yaml.safe_load((ROBOTS_DIR / "gym_humanoid" / "humanoid.yaml").read_text())
    d["observation"]["terms"].append({"name": "lidar", "dim": 360})
    d["mjcf"] = "pkg://gymnasium/envs/mujoco/assets/humanoid.xml"
    p = tmp_path / "h.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ValueError, match=r"unknown observation term 'lidar'"):
        make("mjcf-locomotion", spec=str(p), num_envs=1)


def test_humanoid_reset_rows_built_in_numpy_are_the_torch_formulas_bit_for_bit():
    """task.reset, its command draw and the env's push interval scale a few CPU-drawn numbers in numpy; they must
    give what the same draws give through torch's ops (the earlier code), to the last bit."""
    from s2r.control.rotations import quat_mul_yaw

    env = make("humanoid-walk", num_envs=64, seed=5)
    env.reset()
    task, c = env.task, env.task.cfg
    ids = torch.tensor([1, 5, 6, 17, 40, 63])
    k, nj, b = len(ids), len(task.qpos_adr), task.base_qpos_adr
    for _ in range(20):  # many draws: a last-bit difference would show in some
        g = torch.Generator()
        g.set_state(env.gen.get_state())
        qpos, _ = task.reset(ids)
        u = torch.empty(k * (nj + 1), dtype=torch.float64).uniform_(-1, 1, generator=g)
        noise, yaw = u[:k * nj].view(k, nj), u[k * nj:] * torch.pi
        want = task.qpos0.expand(k, -1).clone()
        want.index_add_(1, task.qpos_adr, c.init_joint_noise * noise)
        want[:, b + 3:b + 7] = quat_mul_yaw(yaw, want[:, b + 3:b + 7])
        assert torch.equal(qpos, want)
        r = torch.rand(k, 4, generator=g)
        cmd = torch.from_numpy(task.command_lo) + r[:, :3] * torch.from_numpy(task.command_span)
        cmd.masked_fill_(r[:, 3:] < c.standing_prob, 0.0)
        assert torch.equal(task.command[ids], cmd)
        lo, hi = env.rand_cfg.push_interval_s
        g.set_state(env.gen.get_state())
        want_push = ((lo + (hi - lo) * torch.rand(k, generator=g)) / env.control_dt).long().clamp_min(1)
        assert torch.equal(env._push_interval(k), want_push)


def test_humanoid_joint_limit_term_is_the_sum_of_both_overshoots_bit_for_bit():
    env = make("humanoid-walk", num_envs=256, seed=0)
    env.reset()
    env.step(torch.zeros(256, env.action_dim))
    task = env.task
    g = torch.Generator().manual_seed(0)
    lo, hi = task.soft_lo, task.soft_hi
    q = lo + (hi - lo) * (torch.rand(256, len(lo), generator=g) * 1.6 - 0.3)  # inside and beyond both limits
    q[0], q[1], q[2, :3] = lo, hi, torch.tensor([float("inf"), float("-inf"), float("nan")])
    task.q = q
    want = ((lo - q).clamp_min(0) + (q - hi).clamp_min(0)).sum(1)
    got = task.reward_terms()["joint_limit"]
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())

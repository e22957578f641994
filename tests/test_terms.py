"""One observation/action definition for sim and robot: the robot's numpy path (control/, as the ROS
node runs it) gives the simulator's observation vector and joint targets for the same states.

States are recorded from every task by stepping the batched simulator with random actions; the robot
path then sees only what a robot has: joint positions/velocities by name, the IMU's orientation and
gyro, commands and goals, and, for the arm, its own kinematics parsed from the MJCF.
"""

import mujoco
import numpy as np
import pytest
import torch
import yaml

from s2r.control.actions import ActionProcessor, EeDeltaController
from s2r.control.kinematics import SerialChain, gripper_coupling
from s2r.control.observations import ObservationBuilder
from s2r.control.spec import RobotSpec, SpecError
from s2r.control.terms import TERMS, RobotState, required_inputs
from s2r.sim import BatchedEnv, EnvConfig
from s2r.sim.tasks import ROBOTS_DIR

CASES = [("humanoid-walk", None), ("humanoid-stand", None), ("arm-reach", None), ("arm-pick", None),
         ("mjcf-locomotion", str(ROBOTS_DIR / "gym_humanoid" / "humanoid.yaml"))]


class RobotSide:
    """What the policy node computes from sensor values, numpy only."""

    def __init__(self, spec: RobotSpec):
        self.spec = spec
        self.obs = ObservationBuilder(spec.observation, num_envs=1, default_q=spec.array("default"))
        self.proc = ActionProcessor(spec)
        self.arm = spec.action.type == "ee_delta"
        if self.arm:
            self.chain = SerialChain.from_spec(spec)  # the robot parses its MJCF itself
            model = mujoco.MjModel.from_xml_path(str(spec.resolve_mjcf()))
            self.finger_names, self.finger_coef = gripper_coupling(model, spec.action.gripper.actuator)
            self.ik = EeDeltaController(spec)
            self.ee_quat_hold = self.chain.forward(np.array([spec.array("default")]))[1]

    def state(self, m: dict) -> RobotState:
        s = RobotState(**{k: v for k, v in m.items() if k in RobotState.__dataclass_fields__})
        if self.arm:
            s.ee_pos = self.chain.forward(s.q)[0]
            s.gripper_opening = (m["fingers"] * self.finger_coef).sum(1, keepdims=True)
        return s

    def targets(self, action: np.ndarray, q: np.ndarray) -> np.ndarray:
        if self.spec.action.type == "joint_torque":
            return self.proc.joint_torques(action)
        if not self.arm:
            return self.proc.joint_targets(action)
        pos, quat, anchors, axes = self.chain.forward(q)
        return self.ik.joint_targets(action, pos, quat, self.ee_quat_hold, anchors, axes)


def measure(env: BatchedEnv, i: int, finger_adr) -> dict:
    """Env i's sensor values as a robot gets them, float64 numpy [1, ...]."""
    st = env.task.robot_state()
    out = {}
    for name in required_inputs(t.name for t in env.spec.observation.terms) + ["q", "qd"]:
        v = getattr(st, name)
        out[name] = v[i:i + 1].detach().to(torch.float64).numpy().copy()
    if finger_adr is not None:
        out["fingers"] = env.backend.qpos[i:i + 1, finger_adr].numpy().copy()
    return out


@pytest.mark.parametrize("task,spec", CASES, ids=[c[0] for c in CASES])
def test_robot_numpy_path_equals_the_simulator(task, spec):
    env = BatchedEnv(EnvConfig(task=task, num_envs=3, nthread=1, seed=5, spec=spec, randomize=False))
    robots = [RobotSide(env.spec) for _ in range(env.num_envs)]
    finger_adr = None
    if robots[0].arm:
        finger_adr = [env.model.jnt_qposadr[mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_JOINT, n)]
                      for n in robots[0].finger_names]
    gen = torch.Generator().manual_seed(0)
    obs = env.reset()
    for i, r in enumerate(robots):
        r.obs.reset()
        if r.arm:
            r.ik.reset(measure(env, i, finger_adr)["q"])
    worst_obs = worst_q = 0.0
    alive = [True] * env.num_envs  # compared while in their first episode
    compared = 0
    for _ in range(25):
        meas = [measure(env, i, finger_adr) for i in range(env.num_envs)]
        for i, r in enumerate(robots):
            if alive[i]:
                o = r.obs.compute_state(r.state(meas[i]))
                assert o.dtype == np.float32 and o.shape == (1, env.obs_dim)
                worst_obs = max(worst_obs, float(np.abs(o[0] - obs["policy"][i].numpy()).max()))
                compared += 1
        action = torch.rand(env.num_envs, env.action_dim, generator=gen) * 2 - 1
        targets = [r.targets(action[i:i + 1].numpy().astype(np.float64), meas[i]["q"]) for i, r in enumerate(robots)]
        obs, _, term, trunc, _ = env.step(action)
        sim_targets = env.ctrl[:, env.task.actuator_id].numpy()  # a finished env's were reset to default
        if env.spec.action.type == "joint_torque":  # motor ctrl is N m / gear
            sim_targets = sim_targets * env.model.actuator_gear[env.task.actuator_id.numpy(), 0]
        for i in range(env.num_envs):
            alive[i] = alive[i] and not bool(term[i] | trunc[i])
            if alive[i]:
                # relative beyond 1 (torques of 120 N m in float32 carry ~1e-5 N m of rounding)
                err = np.abs(targets[i][0] - sim_targets[i]) / np.maximum(1.0, np.abs(sim_targets[i]))
                worst_q = max(worst_q, float(err.max()))
    assert compared >= 30, f"only {compared} states compared"
    print(f"\n{task}: {compared} states, max |obs difference| {worst_obs:.1e}, max joint-target difference "
          f"{worst_q:.1e}")
    assert worst_obs <= 1e-6, f"observation differs by {worst_obs}"
    assert worst_q <= 1e-6, f"joint targets (torques) differ by {worst_q} (relative beyond 1)"


def test_history_and_term_major_layout_agree_too(tmp_path):
    p = tmp_path / "g1_h3.yaml"
    p.write_text(yaml.safe_dump({"base": str(ROBOTS_DIR / "g1" / "g1.yaml"),
                                 "observation": {"history_length": 3, "history_order": "term_major"}}))
    test_robot_numpy_path_equals_the_simulator("humanoid-walk", str(p))


def test_every_registered_term_is_used_by_some_task_and_declares_its_inputs():
    used = set()
    for name in ("g1/g1.yaml", "panda/panda.yaml", "panda/panda_pick.yaml", "gym_humanoid/humanoid.yaml"):
        used |= {t.name for t in RobotSpec.load(ROBOTS_DIR / name).observation.terms}
    assert used == set(TERMS)
    for t in TERMS.values():
        assert t.needs and all(f in RobotState.__dataclass_fields__ for f in t.needs)


def test_spec_refuses_unknown_terms_and_wrong_dims(tmp_path):
    d = yaml.safe_load((ROBOTS_DIR / "g1" / "g1.yaml").read_text())
    d["mjcf"] = str(ROBOTS_DIR / "g1" / "g1.xml")
    d["observation"]["terms"][0]["name"] = "base_angvel"
    with pytest.raises(SpecError, match="unknown observation term 'base_angvel'"):
        RobotSpec.from_dict(d)
    d = yaml.safe_load((ROBOTS_DIR / "g1" / "g1.yaml").read_text())
    d["observation"]["terms"][3]["dim"] = 12  # joint_pos of a 13-joint robot
    with pytest.raises(SpecError, match="'joint_pos' has dim 12, but this robot gives it 13"):
        RobotSpec.from_dict(d)


def test_kinematics_equals_mj_kinematics_on_random_poses():
    spec = RobotSpec.load(ROBOTS_DIR / "panda" / "panda.yaml")
    m = mujoco.MjModel.from_xml_path(str(spec.resolve_mjcf()))
    d = mujoco.MjData(m)
    chain = SerialChain.from_spec(spec)
    jid = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, n) for n in spec.joint_names]
    site = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "ee")
    q = np.random.default_rng(1).uniform(-2, 2, (20, 7))
    pos, quat, anchors, axes = chain.forward(q)
    tpos = chain.forward(torch.tensor(q))[0].numpy()
    for k in range(20):
        d.qpos[[m.jnt_qposadr[j] for j in jid]] = q[k]
        mujoco.mj_kinematics(m, d)
        want = np.zeros(4)
        mujoco.mju_mat2Quat(want, d.site_xmat[site])
        np.testing.assert_allclose(pos[k], d.site_xpos[site], atol=1e-12)
        np.testing.assert_allclose(tpos[k], d.site_xpos[site], atol=1e-12)
        assert min(np.abs(quat[k] - want).max(), np.abs(quat[k] + want).max()) < 1e-12
        np.testing.assert_allclose(anchors[k], d.xanchor[jid], atol=1e-12)
        np.testing.assert_allclose(axes[k], d.xaxis[jid], atol=1e-12)


@pytest.mark.parametrize("xp", ["numpy", "torch"])
def test_rotation_matrix_to_quaternion_is_exact_also_at_180_degrees(xp):
    from s2r.control.kinematics import mat_to_quat

    rng = np.random.default_rng(3)
    quats = rng.normal(size=(200, 4))
    quats[:4] = [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0.6, 0.8, 0]]  # half turns: w = 0
    quats[4:8] = [[1e-9, 1, 0, 0], [1, 0, 0, 0], [0.7071068, 0.7071068, 0, 0], [1e-7, 0, -0.6, 0.8]]
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    mats = np.zeros((200, 3, 3))
    for k, q in enumerate(quats):
        mujoco.mju_quat2Mat(mats[k].reshape(-1), q)
    got = mat_to_quat(mats if xp == "numpy" else torch.tensor(mats))
    got = np.asarray(got)
    same = np.minimum(np.abs(got - quats).max(1), np.abs(got + quats).max(1))
    assert same.max() < 1e-7, same.max()

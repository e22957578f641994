"""arm-reach and arm-pick for a Panda-class arm with a parallel gripper.

Action = end-effector position delta (3, metres per unit x spec scale) + gripper
opening (1, absolute, -1 closed .. +1 open): the space an operator corrects in.
Underneath, `EeDeltaController` (control/actions.py, the code the ROS node runs)
turns the delta into joint position targets for the PD servos with
damped-least-squares IK; the end-effector pose and the joint anchors and axes
come from `SerialChain.forward` (control/kinematics.py) on the current joint
positions, so the whole batch is solved in a few torch calls on either backend,
and the robot computes the same numbers from its joint encoders. The gripper is
kept pointing down by an orientation term in the same IK solve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from s2r.control.actions import ActionProcessor, EeDeltaConfig, EeDeltaController
from s2r.control.kinematics import SerialChain, gripper_coupling
from s2r.control.rotations import quat_from_yaw
from s2r.control.terms import RobotState
from s2r.sim.model import SensorRequest
from s2r.sim.randomization import RandomizationConfig
from s2r.sim.tasks.base import Task, TaskConfig


def _arm_randomization() -> RandomizationConfig:
    return RandomizationConfig(friction=(0.8, 1.2), com_offset=0.0, latency_steps=(0, 2),
                               obs_noise={"joint_pos": 0.002, "joint_vel": 0.02})


@dataclass
class ArmReachConfig(TaskConfig):
    spec: str = "panda/panda.yaml"
    episode_length_s: float = 8.0
    # a new target every resample_s within an episode (0: one per episode): an operator or planner sends
    # goal after goal, so the policy must reach from wherever the last goal left the arm
    resample_s: float = 4.0
    target_low: tuple[float, float, float] = (0.3, -0.3, 0.15)  # m, world frame (arm base at origin)
    target_high: tuple[float, float, float] = (0.65, 0.3, 0.55)
    workspace_low: tuple[float, float, float] = (0.15, -0.6, 0.0)  # IK targets are clamped to this box
    workspace_high: tuple[float, float, float] = (0.85, 0.6, 0.8)
    success_radius: float = 0.02  # m
    ik_damping: float = 0.05
    ik_rot_weight: float = 0.5  # weight of the keep-pointing-down orientation error
    init_joint_noise: float = 0.1  # rad around the home pose
    reward_weights: dict[str, float] = field(default_factory=lambda: {
        "reach": 1.0, "success": 1.0, "action_rate": -0.01, "joint_vel": -1e-3})
    randomization: RandomizationConfig = field(default_factory=_arm_randomization)


@dataclass
class ArmPickConfig(ArmReachConfig):
    spec: str = "panda/panda_pick.yaml"
    episode_length_s: float = 8.0
    resample_s: float = 0.0  # one placement target per episode
    cube_low: tuple[float, float] = (0.4, -0.15)  # m, x/y of the cube's start
    cube_high: tuple[float, float] = (0.6, 0.15)
    target_low: tuple[float, float, float] = (0.4, -0.2, 0.0)  # z is height above the cube's rest height
    target_high: tuple[float, float, float] = (0.6, 0.2, 0.2)
    lift_height: float = 0.02  # m above rest: the cube counts as lifted
    success_radius: float = 0.03
    cube_joint: str = "cube_joint"
    cube_site: str = "cube"
    reward_weights: dict[str, float] = field(default_factory=lambda: {
        "reach": 1.0, "lift": 2.0, "place": 4.0, "success": 4.0, "action_rate": -0.01, "joint_vel": -1e-3})


class ArmReach(Task):
    name = "arm-reach"
    Config = ArmReachConfig
    cfg: ArmReachConfig

    state_fields = ("q", "qd", "ee_pos", "gripper_opening", "goal", "last_action")

    def sensors(self):
        return []

    def bind(self, env):
        if self.spec.action.type != "ee_delta":
            raise ValueError(f"task {self.name} needs a robot spec with action.type ee_delta "
                             f"(got '{self.spec.action.type}' in '{self.spec.name}')")
        super().bind(env)
        dev, N, m = env.device, env.num_envs, env.model
        # the IK in float64, as on the robot: one solve per step for a few dozen arms costs nothing
        self.ik = EeDeltaController(self.spec, EeDeltaConfig(
            workspace_low=self.cfg.workspace_low, workspace_high=self.cfg.workspace_high,
            ik_damping=self.cfg.ik_damping, ik_rot_weight=self.cfg.ik_rot_weight),
            proc=ActionProcessor(self.spec, dev, torch.float64))
        self.ik.reset(self.qpos0[self.qpos_adr].expand(N, -1))
        self.chain = SerialChain.from_model(m, self.spec.joint_names, self.spec.action.ee_site)
        self.g_act = env.index.gripper_act
        self.ee_scale = self.ik.ee_scale.float()  # [3] m per unit action
        self.target = torch.zeros(N, 3, device=dev)
        self.resample_steps = int(round(self.cfg.resample_s / env.control_dt)) if self.cfg.resample_s > 0 else 0
        _, ee_quat, _, _ = self.chain.forward(self.qpos0[self.qpos_adr][None])
        self.ee_quat_home = ee_quat.expand(N, -1)  # [N, 4] the orientation the IK holds
        self._gripper = None  # (qpos addresses [k], dof addresses [k], coefficients [k], names)
        if self.spec.action.gripper is not None:
            names, coef = gripper_coupling(m, self.spec.action.gripper.actuator)
            jid = [mujoco_joint_id(m, n) for n in names]
            self._gripper = (torch.as_tensor(m.jnt_qposadr[jid], device=dev),
                             torch.as_tensor(m.jnt_dofadr[jid], device=dev),
                             torch.as_tensor(coef, dtype=torch.float32, device=dev), names)
        self.refresh()

    # ---- kinematics: the robot's own computation (control/kinematics.py) on the sim's joints ----
    def refresh(self):
        if self.env is None or not hasattr(self, "chain"):
            return
        q64 = self.env.backend.qpos.to(self.env.device, torch.float64)[:, self.qpos_adr]
        self.ee_pos64, self.ee_quat64, self.anchors64, self.axes64 = self.chain.forward(q64)
        self._ee = self.ee_pos64.float()

    def update(self):
        self.refresh()
        if self.resample_steps:
            due = (self.env.episode_step % self.resample_steps == 0) & (self.env.episode_step > 0)
            if due.any():
                ids = due.nonzero().squeeze(-1)
                self.target[ids] = self._sample_target(len(ids))

    def ee_pos(self) -> torch.Tensor:
        return self._ee

    def _sd(self) -> torch.Tensor:
        return self.env.backend.sensordata.to(self.env.device)

    def extra_joints(self):
        if self._gripper is None:
            return []
        qadr, dadr, _, names = self._gripper
        return list(zip(names, qadr.tolist(), dadr.tolist()))

    def gripper_opening(self) -> torch.Tensor:
        """[N, 1] gripper actuator length: sum(coef * finger q) (per-finger opening in metres for the Panda)."""
        if self._gripper is None:
            return torch.zeros(self.env.num_envs, 1, device=self.env.device)
        qadr, _, coef, _ = self._gripper
        qpos = self.env.backend.qpos.to(self.env.device).float()
        return (qpos[:, qadr] * coef).sum(1, keepdim=True)

    def robot_state(self) -> RobotState:
        q, qd = self.joint_state()
        return RobotState(q=q, qd=qd, ee_pos=self.ee_pos(), gripper_opening=self.gripper_opening(),
                          goal=self.target, last_action=self.env.action)

    def default_ctrl(self):
        ctrl = super().default_ctrl()
        if self.g_act is not None:
            ctrl[:, self.g_act] = self.ik.gripper_open
        return ctrl

    def _sample_target(self, k):
        lo, hi = torch.tensor(self.cfg.target_low), torch.tensor(self.cfg.target_high)
        return (lo + (hi - lo) * torch.rand(k, 3, generator=self.env.gen)).to(self.env.device)

    # ---- reset / step --------------------------------------------------------------------
    def reset(self, env_ids):
        k, g, dev = len(env_ids), self.env.gen, self.env.device
        nq, nv = self.env.model.nq, self.env.model.nv
        qpos = self.qpos0.expand(k, nq).clone()
        noise = (torch.rand(k, len(self.qpos_adr), generator=g, dtype=torch.float64) * 2 - 1).to(dev)
        qpos[:, self.qpos_adr] += self.cfg.init_joint_noise * noise
        p = self.ik.proc
        qpos[:, self.qpos_adr] = torch.maximum(torch.minimum(qpos[:, self.qpos_adr], p.upper), p.lower)
        self.ik.reset(qpos[:, self.qpos_adr], env_ids)
        self.target[env_ids] = self._sample_target(k)
        return qpos, torch.zeros(k, nv, dtype=torch.float64, device=dev)

    def after_reset(self, env_ids):
        ctrl = self.env.ctrl
        ctrl[env_ids[:, None], self.actuator_id[None, :]] = self.ik.q_cmd[env_ids].to(ctrl.dtype)

    def process_action(self, action):
        a64 = action.to(torch.float64)
        q_cmd = self.ik.joint_targets(a64, self.ee_pos64, self.ee_quat64, self.ee_quat_home, self.anchors64,
                                      self.axes64)  # [N, nj]
        ctrl = torch.zeros(self.env.num_envs, self.env.model.nu, dtype=torch.float64, device=self.env.device)
        ctrl[:, self.actuator_id] = q_cmd
        grip = self.ik.gripper_command(a64)
        if self.g_act is not None and grip is not None:
            ctrl[:, self.g_act] = grip
        return ctrl

    def scripted_action(self) -> torch.Tensor:
        """A hand-written controller (move the gripper to the target, open): for demos and tests."""
        a = torch.ones(self.env.num_envs, self.env.action_dim, device=self.env.device)
        a[:, :3] = ((self.target - self.ee_pos()) / self.ee_scale).clamp(-1, 1)
        return a

    def _common_terms(self):
        _, qd = self.joint_state()
        return {"action_rate": ((self.env.action - self.env.prev_action) ** 2).sum(1), "joint_vel": (qd ** 2).sum(1)}

    def _dist(self):
        return (self.ee_pos() - self.target).norm(dim=1)

    def reward_terms(self):
        d = self._dist()
        return {"reach": 1.0 - torch.tanh(d / 0.1), "success": (d < self.cfg.success_radius).float(),
                **self._common_terms()}

    def success(self):
        return self._dist() < self.cfg.success_radius

class ArmPick(ArmReach):
    name = "arm-pick"
    Config = ArmPickConfig
    cfg: ArmPickConfig

    state_fields = ArmReach.state_fields + ("object_pos",)

    def sensors(self):
        return [SensorRequest("cube_pos", "framepos", self.cfg.cube_site)]

    def critic_term_dims(self):
        return {"cube_quat": 4, "cube_vel": 6}

    def bind(self, env):
        super().bind(env)
        free = {n: (q, d) for n, q, d in env.index.free_joints}
        if self.cfg.cube_joint not in free:
            raise ValueError(f"task {self.name}: the model has no free joint '{self.cfg.cube_joint}' "
                             f"(free joints: {sorted(free)})")
        self.cq, self.cd = free[self.cfg.cube_joint]
        self.cube_rest_z = float(self.qpos0[self.cq + 2])
        self.s_cube = env.index.sensors["cube_pos"]

    def _sample_target(self, k):
        t = super()._sample_target(k)
        t[:, 2] += self.cube_rest_z
        return t

    def reset(self, env_ids):
        qpos, qvel = super().reset(env_ids)
        k, g, dev = len(env_ids), self.env.gen, self.env.device
        lo, hi = torch.tensor(self.cfg.cube_low), torch.tensor(self.cfg.cube_high)
        xy = (lo + (hi - lo) * torch.rand(k, 2, generator=g)).to(dev, torch.float64)
        yaw = ((torch.rand(k, generator=g, dtype=torch.float64) * 2 - 1) * torch.pi).to(dev)
        qpos[:, self.cq:self.cq + 2] = xy
        qpos[:, self.cq + 2] = self.cube_rest_z
        qpos[:, self.cq + 3:self.cq + 7] = quat_from_yaw(yaw)
        return qpos, qvel

    def cube_pos(self):
        return self._sd()[:, self.s_cube].float()

    def after_reset(self, env_ids):
        super().after_reset(env_ids)
        if not hasattr(self, "phase"):
            self.phase = torch.zeros(self.env.num_envs, dtype=torch.long, device=self.env.device)
            self.phase_steps = torch.zeros_like(self.phase)
        self.phase[env_ids] = 0
        self.phase_steps[env_ids] = 0

    def scripted_action(self) -> torch.Tensor:
        """Staged pick-and-place: above the cube, descend, close, lift and carry to the target."""
        ee, cube = self.ee_pos(), self.cube_pos()
        above = cube + torch.tensor([0.0, 0.0, 0.08], device=ee.device)
        goal = torch.where((self.phase == 0)[:, None], above, cube)
        goal = torch.where((self.phase >= 3)[:, None], self.target, goal)
        self.phase_steps += 1
        near = (goal - ee).norm(dim=1)
        nxt = self.phase.clone()
        nxt[(self.phase == 0) & (near < 0.01)] = 1
        nxt[(self.phase == 1) & (near < 0.006)] = 2
        nxt[(self.phase == 2) & (self.phase_steps > 15)] = 3
        self.phase_steps[nxt != self.phase] = 0
        self.phase = nxt
        a = torch.zeros(self.env.num_envs, self.env.action_dim, device=ee.device)
        a[:, :3] = ((goal - ee) / self.ee_scale).clamp(-1, 1)
        a[:, 3] = torch.where(self.phase >= 2, -1.0, 1.0)
        a[self.phase == 2, :3] = 0.0
        return a

    def terminated(self):
        c = self.cube_pos()
        return (c[:, 2] < self.cube_rest_z - 0.1) | (c[:, :2].norm(dim=1) > 1.2)

    def reward_terms(self):
        ee, cube = self.ee_pos(), self.cube_pos()
        lifted = (cube[:, 2] > self.cube_rest_z + self.cfg.lift_height).float()
        d_place = (cube - self.target).norm(dim=1)
        return {"reach": 1.0 - torch.tanh((ee - cube).norm(dim=1) / 0.1), "lift": lifted,
                "place": lifted * (1.0 - torch.tanh(d_place / 0.1)),
                "success": (d_place < self.cfg.success_radius).float(), **self._common_terms()}

    def success(self):
        return (self.cube_pos() - self.target).norm(dim=1) < self.cfg.success_radius

    def robot_state(self) -> RobotState:
        state = super().robot_state()
        state.object_pos = self.cube_pos()  # on the robot: a perception system's /object_pose
        return state

    def critic_terms(self):
        be, dev = self.env.backend, self.env.device
        return {"cube_quat": be.qpos.to(dev)[:, self.cq + 3:self.cq + 7].float(),
                "cube_vel": be.qvel.to(dev)[:, self.cd:self.cd + 6].float()}


def mujoco_joint_id(model, name: str) -> int:
    import mujoco

    return mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, name)

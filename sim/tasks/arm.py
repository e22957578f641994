"""arm-reach and arm-pick for a Panda-class arm with a parallel gripper.

Action = end-effector position delta (3, metres per unit x spec scale) + gripper
opening (1, absolute, -1 closed .. +1 open): the space an operator corrects in.
Underneath, damped-least-squares IK (control/ik.py) turns the delta into joint
position targets for the PD servos. The Jacobian is assembled from MuJoCo
sensors (each joint's anchor and axis, the end-effector site), so the whole
batch is solved in one torch call on either backend. The gripper is kept
pointing down by an orientation term in the same IK solve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mujoco
import torch

from s2r.control.actions import ActionProcessor
from s2r.control.ik import dls, hinge_jacobian
from s2r.control.rotations import quat_error, quat_from_yaw
from s2r.sim.model import SensorRequest
from s2r.sim.randomization import RandomizationConfig
from s2r.sim.tasks.base import Task, TaskConfig


def _arm_randomization() -> RandomizationConfig:
    return RandomizationConfig(friction=(0.8, 1.2), com_offset=0.0, latency_steps=(0, 2),
                               obs_noise={"joint_pos": 0.002, "joint_vel": 0.02})


@dataclass
class ArmReachConfig(TaskConfig):
    spec: str = "panda/panda.yaml"
    episode_length_s: float = 5.0
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

    def sensors(self):
        s = self.spec.action.ee_site
        return [SensorRequest("ee_pos", "framepos", s), SensorRequest("ee_quat", "framequat", s)]

    def joint_axis_sensors(self):
        return True

    def bind(self, env):
        super().bind(env)
        if self.spec.action.type != "ee_delta":
            raise ValueError(f"task {self.name} needs a robot spec with action.type ee_delta "
                             f"(got '{self.spec.action.type}' in '{self.spec.name}')")
        idx, dev, N, m = env.index, env.device, env.num_envs, env.model
        self.act = ActionProcessor(self.spec, dev)
        self.jq = torch.as_tensor(idx.joint_qpos, device=dev)
        self.jd = torch.as_tensor(idx.joint_dof, device=dev)
        self.ja = torch.as_tensor(idx.joint_act, device=dev)
        self.s_ee, self.s_eeq = idx.sensors["ee_pos"], idx.sensors["ee_quat"]
        self.s_anchor = [idx.sensors[f"jnt_anchor:{n}"] for n in self.spec.joint_names]
        self.s_axis = [idx.sensors[f"jnt_axis:{n}"] for n in self.spec.joint_names]
        g = self.spec.action.gripper
        self.g_act = idx.gripper_act
        self.g_open, self.g_closed = (g.open, g.closed) if g else (0.0, 0.0)
        # gripper opening observation: the gripper actuator's transmission length (finger opening)
        self.ee_scale = torch.as_tensor(self.spec.action_scale_vector(), device=dev)
        self.ws_lo = torch.tensor(self.cfg.workspace_low, device=dev)
        self.ws_hi = torch.tensor(self.cfg.workspace_high, device=dev)
        self.target = torch.zeros(N, 3, device=dev)
        self.q_cmd = self.act.default.expand(N, -1).clone()  # [N, nj] joint targets being integrated
        self.qpos0 = torch.as_tensor(m.qpos0, dtype=torch.float64, device=dev).clone()
        key = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_KEY, "home")
        if key >= 0:
            self.qpos0 = torch.as_tensor(m.key_qpos[key], dtype=torch.float64, device=dev).clone()
        self.qpos0[self.jq] = self.act.default.to(torch.float64)
        d = mujoco.MjData(m)
        d.qpos[:] = self.qpos0.cpu().numpy()
        mujoco.mj_forward(m, d)
        self.ee_quat_home = torch.as_tensor(d.sensordata[self.s_eeq], dtype=torch.float32, device=dev)
        if self.g_act is not None and m.actuator_trntype[self.g_act] == mujoco.mjtTrn.mjTRN_TENDON:
            self._gripper_len = ("tendon", int(m.actuator_trnid[self.g_act, 0]))
        elif self.g_act is not None:
            self._gripper_len = ("joint", int(m.jnt_qposadr[m.actuator_trnid[self.g_act, 0]]))
        else:
            self._gripper_len = None
        self._tendon_coef = None
        if self._gripper_len and self._gripper_len[0] == "tendon":
            t = self._gripper_len[1]
            adr, num = m.tendon_adr[t], m.tendon_num[t]
            jids = m.wrap_objid[adr:adr + num]
            self._tendon_coef = (torch.as_tensor(m.jnt_qposadr[jids], device=dev),
                                 torch.as_tensor(m.wrap_prm[adr:adr + num], dtype=torch.float32, device=dev))

    # ---- helpers ---------------------------------------------------------------------
    def _sd(self):
        return self.env.backend.sensordata.to(self.env.device)

    def ee_pos(self) -> torch.Tensor:
        return self._sd()[:, self.s_ee].float()

    def gripper_opening(self) -> torch.Tensor:
        """[N, 1] actuator length of the gripper (per-finger opening in metres for the Panda model)."""
        if self._gripper_len is None:
            return torch.zeros(self.env.num_envs, 1, device=self.env.device)
        qpos = self.env.backend.qpos.to(self.env.device).float()
        if self._gripper_len[0] == "joint":
            return qpos[:, self._gripper_len[1]:self._gripper_len[1] + 1]
        adr, coef = self._tendon_coef
        return (qpos[:, adr] * coef).sum(1, keepdim=True)

    def default_ctrl(self):
        ctrl = torch.zeros(self.env.num_envs, self.env.model.nu, dtype=torch.float64, device=self.env.device)
        ctrl[:, self.ja] = self.act.default.to(torch.float64)
        if self.g_act is not None:
            ctrl[:, self.g_act] = self.g_open
        return ctrl

    def _sample_target(self, k):
        lo, hi = torch.tensor(self.cfg.target_low), torch.tensor(self.cfg.target_high)
        return (lo + (hi - lo) * torch.rand(k, 3, generator=self.env.gen)).to(self.env.device)

    # ---- reset / step --------------------------------------------------------------------
    def reset(self, env_ids):
        k, g, dev = len(env_ids), self.env.gen, self.env.device
        nq, nv = self.env.model.nq, self.env.model.nv
        qpos = self.qpos0.expand(k, nq).clone()
        noise = (torch.rand(k, len(self.jq), generator=g, dtype=torch.float64) * 2 - 1).to(dev)
        qpos[:, self.jq] += self.cfg.init_joint_noise * noise
        lo = self.act.lower.to(torch.float64)
        hi = self.act.upper.to(torch.float64)
        qpos[:, self.jq] = torch.maximum(torch.minimum(qpos[:, self.jq], hi), lo)
        self.q_cmd[env_ids] = qpos[:, self.jq].float()
        self.target[env_ids] = self._sample_target(k)
        return qpos, torch.zeros(k, nv, dtype=torch.float64, device=dev)

    def after_reset(self, env_ids):
        ctrl = self.env.ctrl
        ctrl[env_ids[:, None], self.ja[None, :]] = self.q_cmd[env_ids].to(ctrl.dtype)

    def process_action(self, action):
        sd = self._sd()
        ee = sd[:, self.s_ee].float()  # [N, 3]
        eeq = sd[:, self.s_eeq].float()
        anchors = torch.stack([sd[:, s] for s in self.s_anchor], dim=1).float()  # [N, nj, 3]
        axes = torch.stack([sd[:, s] for s in self.s_axis], dim=1).float()
        desired = torch.maximum(torch.minimum(ee + self.ee_scale * action[:, :3].clamp(-1, 1), self.ws_hi), self.ws_lo)
        err = torch.cat([desired - ee, self.cfg.ik_rot_weight * quat_error(self.ee_quat_home.expand_as(eeq), eeq)], dim=1)
        jac = hinge_jacobian(anchors, axes, ee)  # [N, 6, nj]
        dq = dls(jac, err, self.cfg.ik_damping)
        self.q_cmd = torch.maximum(torch.minimum(self.q_cmd + dq, self.act.upper), self.act.lower)
        ctrl = torch.zeros(self.env.num_envs, self.env.model.nu, device=self.env.device)
        ctrl[:, self.ja] = self.q_cmd
        if self.g_act is not None and action.shape[1] > 3:
            frac = (action[:, 3].clamp(-1, 1) + 1) * 0.5
            ctrl[:, self.g_act] = self.g_closed + frac * (self.g_open - self.g_closed)
        return ctrl

    def scripted_action(self) -> torch.Tensor:
        """A hand-written controller (move the gripper to the target, open): for demos and tests."""
        a = torch.ones(self.env.num_envs, self.env.action_dim, device=self.env.device)
        a[:, :3] = ((self.target - self.ee_pos()) / self.ee_scale).clamp(-1, 1)
        return a

    def _common_terms(self):
        be, dev = self.env.backend, self.env.device
        qd = be.qvel.to(dev)[:, self.jd].float()
        return {"action_rate": ((self.env.action - self.env.prev_action) ** 2).sum(1), "joint_vel": (qd ** 2).sum(1)}

    def _dist(self):
        return (self.ee_pos() - self.target).norm(dim=1)

    def reward_terms(self):
        d = self._dist()
        return {"reach": 1.0 - torch.tanh(d / 0.1), "success": (d < self.cfg.success_radius).float(),
                **self._common_terms()}

    def success(self):
        return self._dist() < self.cfg.success_radius

    def _joint_obs(self):
        be, dev = self.env.backend, self.env.device
        qpos, qvel = be.qpos.to(dev).float(), be.qvel.to(dev).float()
        ee = self.ee_pos()
        return {"joint_pos": qpos[:, self.jq] - self.act.default, "joint_vel": qvel[:, self.jd],
                "ee_pos": ee, "gripper_opening": self.gripper_opening(), "last_action": self.env.action}

    def observation_terms(self):
        t = self._joint_obs()
        t["target_rel"] = self.target - t["ee_pos"]
        return t


class ArmPick(ArmReach):
    name = "arm-pick"
    Config = ArmPickConfig
    cfg: ArmPickConfig

    def sensors(self):
        return super().sensors() + [SensorRequest("cube_pos", "framepos", self.cfg.cube_site)]

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

    def observation_terms(self):
        t = self._joint_obs()
        cube = self.cube_pos()
        t["cube_rel"] = cube - t["ee_pos"]
        t["cube_target_rel"] = self.target - cube
        return t

    def critic_terms(self):
        be, dev = self.env.backend, self.env.device
        return {"cube_quat": be.qpos.to(dev)[:, self.cq + 3:self.cq + 7].float(),
                "cube_vel": be.qvel.to(dev)[:, self.cd:self.cd + 6].float()}

"""humanoid-walk: velocity-command tracking (vx, vy, yaw rate) for a G1-class biped.

Reward terms are small named functions of the batch state; weights are config.
Observations follow the robot spec (sim/robots/g1/g1.yaml); the critic also gets
privileged terms (true base velocity, height, foot contacts, randomised physics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from s2r.control.actions import pd_torque
from s2r.control.rotations import projected_gravity, quat_rotate, quat_rotate_inverse, quat_turn_z
from s2r.control.terms import RobotState
from s2r.sim.model import SensorRequest
from s2r.sim.randomization import RandomizationConfig, index_or_slice
from s2r.sim.tasks.base import Task, TaskConfig


def _walk_randomization() -> RandomizationConfig:
    # action delay up to one whole control step (4 physics steps = 20 ms at 200 Hz physics): what a
    # ROS 2 loop adds between a sensor message and the command it causes (s2r/ros/sim_loop.py); a
    # policy trained with at most 5 ms stood in simulation and fell through ROS 2 (docs/DEPLOY.md)
    return RandomizationConfig(
        latency_steps=(0, 4),
        obs_noise={"base_ang_vel": 0.2, "projected_gravity": 0.05, "joint_pos": 0.01, "joint_vel": 1.5},
        push_interval_s=(5.0, 15.0), push_velocity=0.5)


@dataclass
class HumanoidWalkConfig(TaskConfig):
    spec: str = "g1/g1.yaml"
    episode_length_s: float = 20.0
    feet_sites: tuple[str, ...] = ("left_foot", "right_foot")
    command_vx: tuple[float, float] = (-0.5, 1.0)  # m/s
    command_vy: tuple[float, float] = (-0.3, 0.3)  # m/s
    command_yaw: tuple[float, float] = (-0.5, 0.5)  # rad/s
    standing_prob: float = 0.1  # share of zero commands
    resample_s: float = 10.0
    tracking_sigma: float = 0.25
    air_time_target_s: float = 0.4
    contact_force: float = 5.0  # N: touch above this counts as contact
    min_base_height: float = 0.45  # m: below this the robot has fallen
    max_tilt_cos: float = -0.5  # projected gravity z above this = fallen (about 60 deg)
    soft_limit: float = 0.9  # share of the joint range beyond which joint_limit penalises
    init_joint_noise: float = 0.1  # rad
    reward_weights: dict[str, float] = field(default_factory=lambda: {
        "track_lin_vel_xy": 1.0, "track_ang_vel_z": 0.5, "alive": 0.5, "upright": 0.5,
        "lin_vel_z": -1.0, "ang_vel_xy": -0.05, "feet_air_time": 1.0, "foot_slip": -0.1,
        "action_rate": -0.01, "torque": -1e-5, "joint_limit": -5.0,
    })
    randomization: RandomizationConfig = field(default_factory=_walk_randomization)


class HumanoidWalk(Task):
    name = "humanoid-walk"
    Config = HumanoidWalkConfig
    cfg: HumanoidWalkConfig

    def sensors(self):
        out = []
        for s in self.cfg.feet_sites:
            out += [SensorRequest(f"{s}_pos", "framepos", s), SensorRequest(f"{s}_vel", "framelinvel", s),
                    SensorRequest(f"{s}_touch", "touch", s)]
        return out

    def critic_term_dims(self):
        return {"base_lin_vel": 3, "base_height": 1, "feet_contact": len(self.cfg.feet_sites),
                "friction": 1, "mass_scale": 1, "strength": 1}

    sim_only_critic_terms = ("friction", "mass_scale", "strength")
    state_fields = ("q", "qd", "base_quat", "base_ang_vel", "base_lin_vel", "base_height", "velocity_command",
                    "last_action")
    needs_floating_base = True

    def bind(self, env):
        super().bind(env)
        idx, dev, N = env.index, env.device, env.num_envs
        nf = len(self.cfg.feet_sites)
        self.s_pos = [idx.sensors[f"{s}_pos"] for s in self.cfg.feet_sites]
        self.s_vel = [idx.sensors[f"{s}_vel"] for s in self.cfg.feet_sites]
        self.s_touch = [idx.sensors[f"{s}_touch"] for s in self.cfg.feet_sites]
        self.i_touch = torch.tensor([s.start for s in self.s_touch], device=dev)
        self.i_vel_xy = torch.tensor([s.start + i for s in self.s_vel for i in (0, 1)], device=dev)  # feet x, y vel.
        self.command = torch.zeros(N, 3, device=dev)
        self.next_resample = torch.zeros(N, dtype=torch.long, device=dev)
        self.air_time = torch.zeros(N, nf, device=dev)
        self.contact = torch.zeros(N, nf, dtype=torch.bool, device=dev)
        self.first_contact = torch.zeros(N, nf, dtype=torch.bool, device=dev)
        self._air_at_touchdown = torch.zeros(N, nf, device=dev)
        self.resample_steps = max(1, int(self.cfg.resample_s / env.control_dt))
        c = self.cfg
        # [3] float32 numpy: a reset's few rows are drawn and scaled on the CPU (_resample)
        self.command_lo = np.array([c.command_vx[0], c.command_vy[0], c.command_yaw[0]], dtype=np.float32)
        self.command_span = np.array([c.command_vx[1] - c.command_vx[0], c.command_vy[1] - c.command_vy[0],
                                      c.command_yaw[1] - c.command_yaw[0]], dtype=np.float32)
        self.qpos0_np = self.qpos0.cpu().numpy()  # [nq] float64, for reset rows built in numpy
        self.qpos_cols = index_or_slice(idx.joint_qpos)  # the spec joints' qpos columns
        lo_hi = torch.as_tensor([j.range for j in self.spec.joints], device=dev)
        mid, half = lo_hi.mean(1), 0.5 * (lo_hi[:, 1] - lo_hi[:, 0])
        self.soft_lo = mid - self.cfg.soft_limit * half
        self.soft_hi = mid + self.cfg.soft_limit * half
        # the spec's joints drive actuators 0..nu-1 in order: ctrl is the joint targets themselves
        self.ctrl_is_targets = torch.equal(self.actuator_id.cpu(), torch.arange(env.model.nu))
        # the randomised physics' critic columns, [N, 1] views of the env's summary (updated in place at resets)
        self.dr_columns = {k: v[:, None] for k, v in env.dr_summary.items()}
        self.ones = torch.ones(N, device=dev)  # [N] the alive reward (read only)

    # ---- reset / commands ---------------------------------------------------------------
    def reset(self, env_ids):
        # a reset of a few envs pays per torch op, not per element: the draws from the env's generator (on
        # the CPU) in torch, the float64 arithmetic on the k rows in numpy (the same roundings, one each),
        # the yaw's cosine and sine in torch (numpy's may differ in the last bit)
        k, dev, g = len(env_ids), self.env.device, self.env.gen
        b, nj = self.base_qpos_adr, len(self.qpos_adr)
        # joint noise [k, nj] and heading [k] from one draw in [-1, 1): the numbers of one draw each
        u = torch.empty(k * (nj + 1), dtype=torch.float64).uniform_(-1, 1, generator=g).numpy()
        noise, yaw = u[:k * nj].reshape(k, nj), u[k * nj:] * np.pi
        qpos = self.qpos0_np[None].repeat(k, 0)  # [k, nq]
        qpos[:, self.qpos_cols] += self.cfg.init_joint_noise * noise
        half = torch.from_numpy(0.5 * yaw[:, None])  # [k, 1]: quat_mul_yaw's half angle
        qpos[:, b + 3:b + 7] = quat_turn_z(torch.cos(half).numpy(), torch.sin(half).numpy(), qpos[:, b + 3:b + 7])
        qpos = torch.from_numpy(qpos).to(dev)
        qvel = torch.zeros(k, self.env.model.nv, dtype=torch.float64, device=dev)
        self._resample(env_ids)
        self.air_time.index_fill_(0, env_ids, 0.0)
        self.contact.index_fill_(0, env_ids, True)
        self.first_contact.index_fill_(0, env_ids, False)
        return qpos, qvel

    def _resample(self, ids):
        """New commands for envs `ids`; the next one resample_steps later (in reset: from step 0)."""
        k, g, c = len(ids), self.env.gen, self.cfg
        r = torch.rand(k, 4, generator=g).numpy()  # float32; numpy float32 arithmetic: torch's numbers, no dispatch
        cmd = self.command_lo + r[:, :3] * self.command_span  # [k, 3] vx, vy, yaw rate, uniform in range
        cmd[r[:, 3] < np.float32(c.standing_prob)] = 0.0  # torch compares float32 with the float32 scalar
        self.command.index_copy_(0, ids, torch.from_numpy(cmd).to(self.env.device))  # command[ids] = cmd
        self.next_resample.index_copy_(0, ids, self.env.episode_step.index_select(0, ids) + self.resample_steps)

    # ---- step ----------------------------------------------------------------------------
    def process_action(self, action):
        self.q_target = self.action_proc.joint_targets(action)  # [N, nj] this step's targets (torque reward)
        if self.ctrl_is_targets:
            return self.q_target
        ctrl = torch.zeros(self.env.num_envs, self.env.model.nu, dtype=torch.float32, device=self.env.device)
        ctrl.index_copy_(1, self.actuator_id, self.q_target)  # ctrl[:, actuator_id] = q_target
        return ctrl

    def update(self):
        self.refresh()
        sd = self.env.backend.sensordata.to(self.env.device, torch.float32)
        touch = sd.index_select(1, self.i_touch)  # [N, nf]
        self.foot_vel_xy = sd.index_select(1, self.i_vel_xy).view(-1, len(self.s_vel), 2)  # [N, nf, 2] world x, y
        contact = touch > self.cfg.contact_force
        self.first_contact = (self.air_time > 0) & contact
        self.air_time += self.env.control_dt
        self._air_at_touchdown = self.air_time * self.first_contact
        self.air_time.masked_fill_(contact, 0.0)
        self.contact = contact
        due = self.env.episode_step >= self.next_resample
        if due.any():
            self._resample(due.nonzero().squeeze(-1))

    def refresh(self):
        """Read the batch state once per step (after physics, and after resets)."""
        be, dev = self.env.backend, self.env.device
        b, bd = self.base_qpos_adr, self.base_dof_adr
        qpos = be.qpos.to(dev, torch.float32, copy=True)  # a snapshot, also on Warp's float32 views
        qvel = be.qvel.to(dev, torch.float32, copy=True)
        self.base_quat = qpos[:, b + 3:b + 7]  # [N, 4] (w, x, y, z)
        self.height = qpos[:, b + 2].contiguous()  # [N] (contiguous: the critic's torch.cat takes its fast path)
        self.ang_vel_b = qvel[:, bd + 3:bd + 6].contiguous()  # [N, 3] body frame (as the free joint's); contiguous
        # as above: the observation frame's torch.cat takes its fast path
        self.lin_vel_w = qvel[:, bd:bd + 3]  # [N, 3] world frame
        self.lin_vel_b = quat_rotate_inverse(self.base_quat, self.lin_vel_w)
        self._gravity_b = None  # on first use: the refresh after a reset has no terminations or rewards to feed
        self.q = qpos.index_select(1, self.qpos_adr)  # [N, nj] (index_select: half the cost of qpos[:, adr])
        self.qd = qvel.index_select(1, self.dof_adr)

    @property
    def gravity_b(self) -> torch.Tensor:
        """[N, 3] gravity direction in the base frame, from the last refresh."""
        if self._gravity_b is None:
            self._gravity_b = projected_gravity(self.base_quat)
        return self._gravity_b

    def robot_state(self) -> RobotState:
        return RobotState(q=self.q, qd=self.qd, base_quat=self.base_quat, base_ang_vel=self.ang_vel_b,
                          base_lin_vel=self.lin_vel_w, base_height=self.height[:, None],
                          velocity_command=self.command, last_action=self.env.action,
                          projected_gravity=self.gravity_b)

    def terminated(self):
        return (self.height < self.cfg.min_base_height) | (self.gravity_b[:, 2] > self.cfg.max_tilt_cos)

    def reward_terms(self):
        c, env = self.cfg, self.env
        g, q, qd, lin_b, ang_b = self.gravity_b, self.q, self.qd, self.lin_vel_b, self.ang_vel_b
        command_xy = self.command[:, :2]  # [N, 2]
        moving = torch.linalg.vector_norm(command_xy, dim=1) > 0.1
        p = self.action_proc
        tau = pd_torque(self.q_target, q, qd, p.kp, p.kd, p.torque_limit)  # q_target: this step's ctrl
        lin_err = ((command_xy - lin_b[:, :2]) ** 2).sum(1)
        yaw_err = (self.command[:, 2] - ang_b[:, 2]) ** 2
        # (lo - q)+ + (q - hi)+ with lo < hi: at most one term is nonzero, and |clamp(q, lo, hi) - q| is that term
        # rounded the same way (rounding is symmetric in sign); 3 ops instead of 5, the same numbers
        out_of_limits = (q.clamp(self.soft_lo, self.soft_hi) - q).abs()
        return {  # exp(err / -sigma): exactly exp(-err / sigma), one op fewer
            "track_lin_vel_xy": torch.exp(lin_err / -c.tracking_sigma),
            "track_ang_vel_z": torch.exp(yaw_err / -c.tracking_sigma),
            "alive": self.ones,
            "upright": torch.exp(-5.0 * (g[:, :2] ** 2).sum(1)),
            "lin_vel_z": lin_b[:, 2] ** 2,
            "ang_vel_xy": (ang_b[:, :2] ** 2).sum(1),
            "feet_air_time": ((self._air_at_touchdown - c.air_time_target_s) * self.first_contact).sum(1) * moving,
            "foot_slip": ((self.foot_vel_xy ** 2).sum(-1) * self.contact).sum(1),
            "action_rate": ((env.action - env.prev_action) ** 2).sum(1),
            "torque": (tau ** 2).sum(1),
            "joint_limit": out_of_limits.sum(1),
        }

    def pose_from_terms(self, terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(qpos [B, nq], qvel [B, nv]) float64 of the robot in a measured state: raw terms base_ang_vel,
        projected_gravity, joint_pos, joint_vel, base_lin_vel (base frame), base_height, each [B, dim].

        The base is put at the origin with heading 0: on flat ground neither changes the physics, and the
        state does not hold them. Roll and pitch come from the gravity direction (normalised), so
        projected_gravity(quat) gives it back. What a simulator steps from when it predicts a measured
        robot's next state (world_models/sim_prior.py)."""
        f64 = {k: v.to(self.env.device, torch.float64) for k, v in terms.items()}
        g = f64["projected_gravity"]
        g = g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-9)
        pitch = torch.asin(g[:, 0].clamp(-1.0, 1.0))  # g_b = (sin p, -cos p sin r, -cos p cos r) for yaw 0
        roll = torch.atan2(-g[:, 1], -g[:, 2])
        cp, sp, cr, sr = torch.cos(pitch / 2), torch.sin(pitch / 2), torch.cos(roll / 2), torch.sin(roll / 2)
        quat = torch.stack([cp * cr, cp * sr, sp * cr, -sp * sr], dim=1)  # q_y(pitch) q_x(roll): (w, x, y, z)
        B, b, bd = g.shape[0], self.base_qpos_adr, self.base_dof_adr
        qpos = self.qpos0.expand(B, -1).clone()
        qpos[:, b:b + 2] = 0.0
        qpos[:, b + 2] = f64["base_height"].reshape(B)
        qpos[:, b + 3:b + 7] = quat
        qpos[:, self.qpos_adr] = f64["joint_pos"] + self.qpos0[self.qpos_adr]
        qvel = torch.zeros(B, self.env.model.nv, dtype=torch.float64, device=self.env.device)
        qvel[:, bd:bd + 3] = quat_rotate(quat, f64["base_lin_vel"])  # the free joint's linear part: world frame
        qvel[:, bd + 3:bd + 6] = f64["base_ang_vel"]  # its angular part: base frame
        qvel[:, self.dof_adr] = f64["joint_vel"]
        return qpos, qvel

    def critic_terms(self):
        return {"base_lin_vel": self.lin_vel_b, "base_height": self.height[:, None],
                "feet_contact": self.contact.float(), **self.dr_columns}


def _stand_randomization() -> RandomizationConfig:
    # the walking task's latency (up to one control step), gentler noise and more frequent pushes
    return RandomizationConfig(
        latency_steps=(0, 4),
        obs_noise={"base_ang_vel": 0.1, "projected_gravity": 0.03, "joint_pos": 0.01, "joint_vel": 0.75},
        push_interval_s=(4.0, 8.0), push_velocity=0.3)


@dataclass
class HumanoidStandConfig(HumanoidWalkConfig):
    """Stand still: the zero command of humanoid-walk, always. Learnable on a CPU in minutes, so it is
    the policy the ROS 2 sim-to-sim loop is tested with (the full walking recipe needs a GPU)."""

    episode_length_s: float = 20.0
    command_vx: tuple[float, float] = (0.0, 0.0)
    command_vy: tuple[float, float] = (0.0, 0.0)
    command_yaw: tuple[float, float] = (0.0, 0.0)
    standing_prob: float = 1.0
    reward_weights: dict[str, float] = field(default_factory=lambda: {
        "track_lin_vel_xy": 1.0, "track_ang_vel_z": 0.5, "alive": 1.0, "upright": 1.0, "height": 1.0,
        "lin_vel_z": -1.0, "ang_vel_xy": -0.05, "foot_slip": -0.1, "action_rate": -0.01, "torque": -1e-5,
        "joint_limit": -5.0, "pose": -0.1,
    })
    target_height: float = 0.0  # m; <= 0: the home keyframe's base height
    randomization: RandomizationConfig = field(default_factory=_stand_randomization)


class HumanoidStand(HumanoidWalk):
    name = "humanoid-stand"
    Config = HumanoidStandConfig
    cfg: HumanoidStandConfig

    def bind(self, env):
        super().bind(env)
        self.h0 = self.cfg.target_height if self.cfg.target_height > 0 else float(self.qpos0[self.base_qpos_adr + 2])

    def reward_terms(self):
        out = super().reward_terms()
        del out["feet_air_time"]
        out["height"] = torch.exp(-((self.height - self.h0) / 0.05) ** 2)
        out["pose"] = ((self.q - self.action_proc.default) ** 2).sum(1)
        return out

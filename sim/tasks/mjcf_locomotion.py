"""mjcf-locomotion: run any floating-base MJCF from a robot spec, with a generic forward-walking task.

This is how a user brings their own model (e.g. MuJoCo Menagerie's G1, or
gymnasium's humanoid.xml in sim/robots/gym_humanoid/): write a spec YAML that
names the MJCF and its joints, then `--task mjcf-locomotion --spec that.yaml`.
Reward follows gymnasium's Humanoid (forward velocity + healthy - control cost),
so throughput comparisons against Humanoid-v5 run the same model and work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from s2r.control.terms import RobotState
from s2r.sim.randomization import RandomizationConfig
from s2r.sim.tasks.base import Task, TaskConfig


@dataclass
class MjcfLocomotionConfig(TaskConfig):
    spec: str = ""  # required: --spec PATH.yaml
    episode_length_s: float = 15.0
    healthy_z: tuple[float, float] = (1.0, 2.0)  # base height range; outside it the episode ends
    reset_noise: float = 0.01  # uniform +- on qpos and qvel at reset (as gymnasium)
    reward_weights: dict[str, float] = field(default_factory=lambda: {
        "forward_velocity": 1.25, "healthy": 5.0, "ctrl_cost": -0.1})
    randomization: RandomizationConfig = field(default_factory=lambda: RandomizationConfig(enabled=False))


class MjcfLocomotion(Task):
    name = "mjcf-locomotion"
    Config = MjcfLocomotionConfig
    cfg: MjcfLocomotionConfig

    state_fields = ("q", "qd", "base_quat", "base_ang_vel", "base_lin_vel", "base_height", "last_action")
    needs_floating_base = True

    def bind(self, env):
        super().bind(env)
        dev = env.device
        # gymnasium's reset: the model's qpos0 (not a keyframe) plus noise
        self.qpos0 = torch.as_tensor(env.model.qpos0, dtype=torch.float64, device=dev)
        self.prev_x = torch.zeros(env.num_envs, dtype=torch.float64, device=dev)
        self.torque_mode = self.spec.action.type == "joint_torque"
        # joint_torque actions are N m at the joint; motor ctrl is N m / gear
        self.gear = torch.as_tensor(env.model.actuator_gear[env.index.joint_act, 0], dtype=torch.float32, device=dev)

    def reset(self, env_ids):
        k, g, m, dev = len(env_ids), self.env.gen, self.env.model, self.env.device
        a = self.cfg.reset_noise
        qpos = self.qpos0.expand(k, m.nq) + a * (2 * torch.rand(k, m.nq, generator=g, dtype=torch.float64) - 1).to(dev)
        qvel = a * (2 * torch.rand(k, m.nv, generator=g, dtype=torch.float64) - 1).to(dev)
        self.prev_x[env_ids] = qpos[:, self.base_qpos_adr]
        return qpos, qvel

    def process_action(self, action):
        ctrl = torch.zeros(self.env.num_envs, self.env.model.nu, device=self.env.device)
        p = self.action_proc
        ctrl.index_copy_(1, self.actuator_id,  # ctrl[:, actuator_id] = ...
                         p.joint_torques(action) / self.gear if self.torque_mode else p.joint_targets(action))
        return ctrl

    def terminated(self):
        z = self.env.backend.qpos[:, self.base_qpos_adr + 2].to(self.env.device)
        return (z < self.cfg.healthy_z[0]) | (z > self.cfg.healthy_z[1])

    def reward_terms(self):
        x = self.env.backend.qpos[:, self.base_qpos_adr].to(self.env.device)
        vx = (x - self.prev_x) / self.env.control_dt
        self.prev_x = x.clone()
        return {"forward_velocity": vx.float(), "healthy": (~self.terminated()).float(),
                "ctrl_cost": (self.env.action ** 2).sum(1)}

    def robot_state(self) -> RobotState:
        be, dev = self.env.backend, self.env.device
        b, bd = self.base_qpos_adr, self.base_dof_adr
        qpos, qvel = be.qpos.to(dev), be.qvel.to(dev)
        q, qd = self.joint_state()
        return RobotState(q=q, qd=qd, base_quat=qpos[:, b + 3:b + 7].float(),
                          base_ang_vel=qvel[:, bd + 3:bd + 6].float(), base_lin_vel=qvel[:, bd:bd + 3].float(),
                          base_height=qpos[:, b + 2:b + 3].float(), last_action=self.env.action)

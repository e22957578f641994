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

from s2r.control.actions import ActionProcessor
from s2r.control.observations import base_terms
from s2r.control.rotations import quat_rotate_inverse
from s2r.sim.randomization import RandomizationConfig
from s2r.sim.tasks.base import Task, TaskConfig

KNOWN_TERMS = ("joint_pos", "joint_vel", "base_height", "base_lin_vel", "base_ang_vel",
               "projected_gravity", "last_action")


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

    def bind(self, env):
        super().bind(env)
        unknown = [t.name for t in self.spec.observation.terms if t.name not in KNOWN_TERMS]
        if unknown:
            raise ValueError(f"task {self.name}: observation term(s) {unknown} in robot spec "
                             f"'{self.spec.name}' are not provided (known: {list(KNOWN_TERMS)})")
        idx, dev = env.index, env.device
        if idx.base_qpos is None:
            raise ValueError(f"task {self.name} needs spec.base_body with a free joint "
                             f"(robot spec '{self.spec.name}')")
        self.act = ActionProcessor(self.spec, dev)
        self.jq = torch.as_tensor(idx.joint_qpos, device=dev)
        self.jd = torch.as_tensor(idx.joint_dof, device=dev)
        self.ja = torch.as_tensor(idx.joint_act, device=dev)
        self.b, self.bd = idx.base_qpos, idx.base_dof
        self.qpos0 = torch.as_tensor(env.model.qpos0, dtype=torch.float64, device=dev)
        self.prev_x = torch.zeros(env.num_envs, dtype=torch.float64, device=dev)
        self.torque_mode = self.spec.action.type == "joint_torque"
        # joint_torque actions are N m at the joint; motor ctrl is N m / gear
        self.gear = torch.as_tensor(env.model.actuator_gear[idx.joint_act, 0], dtype=torch.float32, device=dev)

    def default_ctrl(self):
        ctrl = torch.zeros(self.env.num_envs, self.env.model.nu, dtype=torch.float64, device=self.env.device)
        if not self.torque_mode:
            ctrl[:, self.ja] = self.act.default.to(torch.float64)
        return ctrl

    def reset(self, env_ids):
        k, g, m, dev = len(env_ids), self.env.gen, self.env.model, self.env.device
        a = self.cfg.reset_noise
        qpos = self.qpos0.expand(k, m.nq) + a * (2 * torch.rand(k, m.nq, generator=g, dtype=torch.float64) - 1).to(dev)
        qvel = a * (2 * torch.rand(k, m.nv, generator=g, dtype=torch.float64) - 1).to(dev)
        self.prev_x[env_ids] = qpos[:, self.b]
        return qpos, qvel

    def process_action(self, action):
        ctrl = torch.zeros(self.env.num_envs, self.env.model.nu, device=self.env.device)
        ctrl[:, self.ja] = self.act.joint_torques(action) / self.gear if self.torque_mode else self.act.joint_targets(action)
        return ctrl

    def terminated(self):
        z = self.env.backend.qpos[:, self.b + 2].to(self.env.device)
        return (z < self.cfg.healthy_z[0]) | (z > self.cfg.healthy_z[1])

    def reward_terms(self):
        x = self.env.backend.qpos[:, self.b].to(self.env.device)
        vx = (x - self.prev_x) / self.env.control_dt
        self.prev_x = x.clone()
        return {"forward_velocity": vx.float(), "healthy": (~self.terminated()).float(),
                "ctrl_cost": (self.env.action ** 2).sum(1)}

    def observation_terms(self):
        be, dev = self.env.backend, self.env.device
        qpos, qvel = be.qpos.to(dev), be.qvel.to(dev)
        quat = qpos[:, self.b + 3:self.b + 7].float()
        ang = qvel[:, self.bd + 3:self.bd + 6].float()
        t = base_terms(quat, ang)
        t["joint_pos"] = qpos[:, self.jq].float() - self.act.default
        t["joint_vel"] = qvel[:, self.jd].float()
        t["base_height"] = qpos[:, self.b + 2:self.b + 3].float()
        t["base_lin_vel"] = quat_rotate_inverse(quat, qvel[:, self.bd:self.bd + 3].float())
        t["last_action"] = self.env.action
        return t

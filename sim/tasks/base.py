"""Task interface: what the robot should do, expressed over the whole batch.

A task declares the sensors it needs, draws initial states and commands,
turns actions into actuator controls, and computes reward terms and
terminations as torch tensors `[num_envs, ...]` from the backend's state and
sensordata. Observations are not the task's: it fills a `RobotState` (what a
robot would measure or be told) and the env computes the spec's terms from it
with control/terms.py, the code the robot runs. A task never loops over envs
in Python and never steps physics: the env (sim/env.py) owns the step order.

`Task.bind` finds, once, where the spec's joints live in the compiled model
(MuJoCo's names: `qpos_adr`, `dof_adr`, `actuator_id`, `base_qpos_adr`,
`base_dof_adr`), the start pose `qpos0` (the model's `home` keyframe with the
spec's default joint pose) and the actuator controls that hold it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mujoco
import torch

from s2r.control.actions import ActionProcessor
from s2r.control.spec import RobotSpec
from s2r.control.terms import RobotState, required_inputs
from s2r.sim.model import SensorRequest
from s2r.sim.randomization import RandomizationConfig

if TYPE_CHECKING:
    from s2r.sim.env import BatchedEnv


@dataclass
class TaskConfig:
    spec: str = ""  # robot spec YAML (path, or name relative to sim/robots/)
    episode_length_s: float = 20.0
    reward_weights: dict[str, float] = field(default_factory=dict)
    randomization: RandomizationConfig = field(default_factory=RandomizationConfig)


class Task:
    name = "abstract"
    Config = TaskConfig

    def __init__(self, cfg: TaskConfig, spec: RobotSpec):
        self.cfg = cfg
        self.spec = spec
        self.env: BatchedEnv | None = None

    # ---- declared once ---------------------------------------------------------
    def sensors(self) -> list[SensorRequest]:
        return []

    def critic_term_dims(self) -> dict[str, int]:
        """Privileged terms appended (unscaled) to the policy frame for the critic."""
        return {}

    # Critic terms only a simulator knows (its randomised physics). A robot cannot measure them, and a
    # shifted target puts them outside the pretraining range (10 stds for 20 % weaker motors), where the
    # critics extrapolate: finetuning on a target feeds them their pretraining mean instead.
    sim_only_critic_terms: tuple[str, ...] = ()

    # RobotState fields this task fills (robot_state); the spec's terms may need no others
    state_fields: tuple[str, ...] = ("q", "qd", "last_action")
    needs_floating_base: bool = False

    def bind(self, env: "BatchedEnv") -> None:
        """Called once the model is compiled: joint/actuator addresses, start pose, task state."""
        self.env = env
        idx, dev, m = env.index, env.device, env.model
        missing = [f for f in required_inputs(t.name for t in self.spec.observation.terms)
                   if f not in self.state_fields]
        if missing:
            raise ValueError(f"task {self.name}: robot spec '{self.spec.name}' lists observation terms that need "
                             f"{missing}, which this task does not provide (it provides {list(self.state_fields)})")
        self.action_proc = ActionProcessor(self.spec, dev)  # spec constants as torch tensors [nj]
        self.qpos_adr = torch.as_tensor(idx.joint_qpos, device=dev)  # [nj] spec joint -> qpos address
        self.dof_adr = torch.as_tensor(idx.joint_dof, device=dev)  # [nj] -> dof address
        self.actuator_id = torch.as_tensor(idx.joint_act, device=dev)  # [nj] -> actuator id
        self.base_qpos_adr, self.base_dof_adr = idx.base_qpos, idx.base_dof  # free joint of the base, or None
        if self.needs_floating_base and self.base_qpos_adr is None:
            raise ValueError(f"task {self.name} needs a floating base: robot spec '{self.spec.name}' "
                             f"base_body must carry a free joint")
        qpos0 = torch.as_tensor(m.qpos0, dtype=torch.float64, device=dev).clone()  # [nq]
        key = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_KEY, "home")
        if key >= 0:
            qpos0 = torch.as_tensor(m.key_qpos[key], dtype=torch.float64, device=dev).clone()
        qpos0[self.qpos_adr] = torch.as_tensor(self.spec.array("default"), dtype=torch.float64, device=dev)
        self.qpos0 = qpos0

    def joint_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [N, nj], qd [N, nj]) float32 in spec order, from the backend's current state."""
        be, dev = self.env.backend, self.env.device
        return (be.qpos.to(dev).index_select(1, self.qpos_adr).float(),
                be.qvel.to(dev).index_select(1, self.dof_adr).float())

    def robot_state(self) -> RobotState:
        """What a robot would measure or be told now, batched [N, ...] (fields as in state_fields)."""
        q, qd = self.joint_state()
        return RobotState(q=q, qd=qd, last_action=self.env.action)

    def extra_joints(self) -> list[tuple[str, int, int]]:
        """(name, qpos address, dof address) of measured joints outside the spec (e.g. gripper fingers)
        that a hardware interface also reports in /joint_states."""
        return []

    # ---- per step / reset ---------------------------------------------------------
    def reset(self, env_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial (qpos [k, nq], qvel [k, nv]) for env_ids; reset task state (commands...)."""
        raise NotImplementedError

    def process_action(self, action: torch.Tensor) -> torch.Tensor:
        """action: [N, action_dim] in [-1, 1] -> actuator ctrl [N, nu]."""
        raise NotImplementedError

    def default_ctrl(self) -> torch.Tensor:
        """Actuator controls that hold the default pose: [N, nu] (used at reset)."""
        ctrl = torch.zeros(self.env.num_envs, self.env.model.nu, dtype=torch.float64, device=self.env.device)
        if self.spec.action.type != "joint_torque":
            ctrl[:, self.actuator_id] = self.action_proc.default.to(torch.float64)
        return ctrl

    def after_reset(self, env_ids: torch.Tensor) -> None:
        """Hook after env_ids were reset and their controls set to default_ctrl."""

    def refresh(self) -> None:
        """Read the batch state into cached tensors; called after physics and after resets."""

    def update(self) -> None:
        """After physics: refresh derived state (contacts, air time, command resampling)."""

    def terminated(self) -> torch.Tensor:
        """[N] bool: a true MDP termination (fall, object lost), not a time limit."""
        return torch.zeros(self.env.num_envs, dtype=torch.bool, device=self.env.device)

    def reward_terms(self) -> dict[str, torch.Tensor]:
        """Unweighted terms, each [N]; the env multiplies by cfg.reward_weights."""
        raise NotImplementedError

    def critic_terms(self) -> dict[str, torch.Tensor]:
        return {}

    def success(self) -> torch.Tensor | None:
        """[N] bool where the task counts as solved (manipulation), or None."""
        return None

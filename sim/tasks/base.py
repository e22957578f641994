"""Task interface: what the robot should do, expressed over the whole batch.

A task declares the sensors it needs, draws initial states and commands,
turns actions into actuator controls, and computes observation terms,
reward terms and terminations as torch tensors `[num_envs, ...]` from the
backend's state and sensordata. It never loops over envs in Python and never
steps physics: the env (sim/env.py) owns the step order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from s2r.control.spec import RobotSpec
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

    def joint_axis_sensors(self) -> bool:
        return False

    def critic_term_dims(self) -> dict[str, int]:
        """Privileged terms appended (unscaled) to the policy frame for the critic."""
        return {}

    def bind(self, env: "BatchedEnv") -> None:
        """Called once the model is compiled: cache indices, allocate task state."""
        self.env = env

    # ---- per step / reset ---------------------------------------------------------
    def reset(self, env_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial (qpos [k, nq], qvel [k, nv]) for env_ids; reset task state (commands...)."""
        raise NotImplementedError

    def process_action(self, action: torch.Tensor) -> torch.Tensor:
        """action: [N, action_dim] in [-1, 1] -> actuator ctrl [N, nu]."""
        raise NotImplementedError

    def default_ctrl(self) -> torch.Tensor:
        """Actuator controls that hold the default pose: [N, nu] (used at reset)."""
        return torch.zeros(self.env.num_envs, self.env.model.nu, dtype=torch.float64, device=self.env.device)

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

    def observation_terms(self) -> dict[str, torch.Tensor]:
        """Raw policy terms named as in the robot spec's observation layout, each [N, dim]."""
        raise NotImplementedError

    def critic_terms(self) -> dict[str, torch.Tensor]:
        return {}

    def success(self) -> torch.Tensor | None:
        """[N] bool where the task counts as solved (manipulation), or None."""
        return None

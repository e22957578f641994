"""The batched-env contract the trainer, evaluation and export are written against.

s2r's simulator (sim/env.py: BatchedEnv), the gymnasium adapter (sim/gym.py:
GymnasiumBatchedEnv) and, later, a learned world-model env all provide it. Tensors are
[num_envs, ...]; actions are in [-1, 1]. An env auto-resets: the observation returned for an env
whose episode ended is the first one of its next episode, and info["final_obs"] holds the last one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from s2r.control.spec import RobotSpec

Obs = dict[str, Tensor]  # {"policy": [num_envs, obs_dim], "critic": [num_envs, critic_obs_dim]}


@runtime_checkable
class BatchedEnvProtocol(Protocol):
    num_envs: int
    obs_dim: int  # policy observation width
    critic_obs_dim: int  # critic (privileged) observation width; == obs_dim where there is none
    action_dim: int
    max_episode_steps: int | None  # truncation horizon in env steps; None: the env never truncates
    spec: RobotSpec | None  # the robot contract (None: a gymnasium task without one)

    def reset(self, seed: int | None = None) -> Obs:
        """Reset every env; -> {"policy": [N, obs_dim], "critic": [N, critic_obs_dim]}."""
        ...

    def step(self, action: Tensor) -> tuple[Obs, Tensor, Tensor, Tensor, dict[str, Any]]:
        """action [N, action_dim] -> (obs, reward [N], terminated [N] bool, truncated [N] bool, info).

        info["final_obs"] (an Obs, valid where terminated | truncated) is present whenever an episode
        ended this step, with info["episode"] = {"return", "length", "env_ids"} of those episodes;
        info["success"] [N] bool where the task defines success."""
        ...

    def close(self) -> None: ...

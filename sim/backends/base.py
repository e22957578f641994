"""Simulator backend interface: advance `num_envs` copies of one MuJoCo model.

A backend owns the physics state of every env and exposes it as torch tensors
with a leading `[num_envs, ...]` dimension. The env (sim/env.py) drives it with
one call per control step carrying `nstep` = decimation controls per env, so
latency and zero-order hold are expressed in the control array, not in Python
loops. New simulators (e.g. an Isaac Lab backend on an RTX machine) implement
this class; nothing above it changes.
"""

from __future__ import annotations

import abc

import mujoco
import numpy as np
import torch

# Model fields that domain randomisation may change per env (see sim/randomization.py).
RANDOMIZABLE_FIELDS = (
    "geom_friction", "body_mass", "body_ipos", "body_inertia", "actuator_gainprm",
    "actuator_biasprm", "actuator_forcerange", "dof_frictionloss", "dof_armature",
)


class Backend(abc.ABC):
    name: str = "abstract"

    def __init__(self, model: mujoco.MjModel, num_envs: int, device: torch.device):
        self.model = model  # host (nominal) model
        self.num_envs = num_envs
        self.device = device
        self.diverged_total = 0  # envs reset because the physics diverged

    # Views of the current state, [num_envs, ...], valid after step()/reset_envs().
    qpos: torch.Tensor  # [N, nq]
    qvel: torch.Tensor  # [N, nv]
    sensordata: torch.Tensor  # [N, nsensordata]: computed inside the last physics step

    @abc.abstractmethod
    def step(self, ctrl: torch.Tensor) -> torch.Tensor:
        """Advance every env by ctrl.shape[1] physics steps.

        ctrl: [N, nstep, nu]. Returns diverged: [N] bool (NaN/Inf, MuJoCo's own
        instability reset, or runaway velocities); those envs must be reset by the caller.
        """

    @abc.abstractmethod
    def reset_envs(self, env_ids: torch.Tensor, qpos: torch.Tensor, qvel: torch.Tensor) -> None:
        """Set env_ids to (qpos [k, nq], qvel [k, nv]) at rest: act, warmstart and time zeroed,
        sensordata recomputed for the new state."""

    @abc.abstractmethod
    def set_params(self, env_ids: torch.Tensor, params: dict[str, np.ndarray]) -> None:
        """Write per-env model parameters: params[field]: [k, *model.field.shape]."""

    def set_qvel(self, env_ids: torch.Tensor, qvel: torch.Tensor) -> None:
        """Overwrite velocities (pushes) without a reset."""
        self.qvel[env_ids] = qvel.to(self.qvel.dtype)

    def close(self) -> None:
        pass


def divergence_mask(qpos: torch.Tensor, qvel: torch.Tensor, max_qvel: float) -> torch.Tensor:
    """[N] True where the state is non-finite or velocities ran away."""
    bad = ~torch.isfinite(qpos).all(dim=1) | ~torch.isfinite(qvel).all(dim=1)
    return bad | (qvel.abs() > max_qvel).any(dim=1)

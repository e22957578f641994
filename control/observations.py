"""Observation builder: named raw terms -> the policy's observation vector.

The task (in simulation) or the ROS node (on the robot) computes each term's raw
value; this builder applies the spec's scale and clip, concatenates the terms in
spec order and keeps the history (frame-major or term-major). Because both sides
use this one class, the layout cannot drift between training and deployment.
"""

from __future__ import annotations

import torch

from s2r.control.rotations import projected_gravity
from s2r.control.spec import ObservationSpec


class ObservationError(ValueError):
    pass


class ObservationBuilder:
    def __init__(self, spec: ObservationSpec, num_envs: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.dtype = dtype
        self.names = [t.name for t in spec.terms]
        self.dims = [t.dim for t in spec.terms]
        self.H = spec.history_length
        f = spec.frame_dim
        self._scale = torch.cat([torch.full((t.dim,), t.scale) for t in spec.terms]).to(self.device, dtype)
        self._clip = torch.cat([torch.full((t.dim,), t.clip) for t in spec.terms]).to(self.device, dtype)
        self.history = torch.zeros(num_envs, self.H, f, device=self.device, dtype=dtype)  # [N, H, frame]
        self._fresh = torch.ones(num_envs, dtype=torch.bool, device=self.device)  # fill history on next compute
        if spec.history_order == "term_major":
            # index that reorders [H, frame] (frame-major flat) into term-major flat
            idx = torch.arange(self.H * f).reshape(self.H, f)
            parts, start = [], 0
            for d in self.dims:
                parts.append(idx[:, start:start + d].reshape(-1))
                start += d
            self._perm = torch.cat(parts).to(self.device)
        else:
            self._perm = None

    @property
    def dim(self) -> int:
        return self.spec.dim

    def frame(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scaled, clipped, concatenated current frame. [N, frame_dim]"""
        parts = []
        for name, dim in zip(self.names, self.dims):
            v = values.get(name)
            if v is None:
                raise ObservationError(f"observation term '{name}' missing (got terms {sorted(values)})")
            if v.ndim != 2 or v.shape[1] != dim:
                raise ObservationError(f"observation term '{name}' has shape {tuple(v.shape)}, "
                                       f"the robot spec says [num_envs, {dim}]")
            parts.append(v.to(self.dtype))
        raw = torch.cat(parts, dim=-1)
        return torch.clamp(raw * self._scale, -self._clip, self._clip)

    def reset(self, env_ids: torch.Tensor | None = None) -> None:
        """Mark envs whose history restarts: the next frame fills their whole history."""
        if env_ids is None:
            self._fresh[:] = True
        else:
            self._fresh[env_ids] = True

    def compute(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Push the current frame into the history and return the observation. [N, obs_dim]"""
        return self.push(self.frame(values))

    def push(self, fr: torch.Tensor) -> torch.Tensor:
        """Push an already built frame [N, frame_dim]; return the observation [N, obs_dim]."""
        if self.H > 1:
            self.history = torch.roll(self.history, shifts=-1, dims=1)
        self.history[:, -1] = fr
        if self._fresh.any():
            self.history[self._fresh] = fr[self._fresh].unsqueeze(1).expand(-1, self.H, -1)
            self._fresh[:] = False
        flat = self.history.reshape(self.num_envs, -1)
        # a copy: the caller keeps this tensor across steps while the history is updated in place
        return flat.clone() if self._perm is None else flat[:, self._perm]


# ---- raw terms shared by sim and robot ----------------------------------------------

def base_terms(base_quat: torch.Tensor, base_ang_vel: torch.Tensor) -> dict[str, torch.Tensor]:
    """IMU-derived terms: body-frame angular velocity and gravity direction."""
    return {"base_ang_vel": base_ang_vel, "projected_gravity": projected_gravity(base_quat)}


"""Observation builder: a RobotState -> the policy's observation vector, numpy or torch.

The terms come from control/terms.py (one definition each); this builder applies the
spec's scale and clip, concatenates the terms in spec order and keeps the history
(frame-major or term-major). The simulator builds it over torch tensors `[num_envs, ...]`
(`xp="torch"`), the ROS node over numpy with num_envs = 1: the same code, so the layout
cannot drift between training and deployment.
"""

from __future__ import annotations

import numpy as np

from s2r.control.spec import ObservationSpec
from s2r.control.terms import RobotState, TermContext, compute_terms


class ObservationError(ValueError):
    pass


class ObservationBuilder:
    """xp: "numpy" (robot) or "torch" (simulation; device/dtype are torch's)."""

    def __init__(self, spec: ObservationSpec, num_envs: int, device=None, dtype=None, xp: str | None = None,
                 default_q=None):
        self.spec = spec
        self.num_envs = num_envs
        self.names = [t.name for t in spec.terms]
        self.dims = [t.dim for t in spec.terms]
        self.H = spec.history_length
        f = spec.frame_dim
        scale = np.concatenate([np.full(t.dim, t.scale) for t in spec.terms])
        clip = np.concatenate([np.full(t.dim, t.clip) for t in spec.terms])
        perm = None
        if spec.history_order == "term_major":
            # index that reorders [H, frame] (frame-major flat) into term-major flat
            idx = np.arange(self.H * f).reshape(self.H, f)
            parts, start = [], 0
            for d in self.dims:
                parts.append(idx[:, start:start + d].reshape(-1))
                start += d
            perm = np.concatenate(parts)
        xp = xp or ("numpy" if device is None else "torch")
        if xp == "numpy":
            self.xp = np
            self.dtype = dtype or np.float32
            self._arr = lambda a, dt=None: np.asarray(a, dtype=dt or self.dtype)  # noqa: E731
            self.history = np.zeros((num_envs, self.H, f), dtype=self.dtype)  # [N, H, frame]
            self._fresh = np.ones(num_envs, dtype=bool)  # fill history on the next push
        elif xp == "torch":
            import torch

            self.xp = torch
            self.device = torch.device(device or "cpu")
            self.dtype = dtype or torch.float32
            self._arr = lambda a, dt=None: torch.as_tensor(a, dtype=dt or self.dtype, device=self.device)  # noqa: E731
            self.history = torch.zeros(num_envs, self.H, f, dtype=self.dtype, device=self.device)
            self._fresh = torch.ones(num_envs, dtype=torch.bool, device=self.device)
        else:
            raise ValueError(f"xp must be 'numpy' or 'torch', got {xp!r}")
        self._scale = self._arr(scale)
        self._clip = self._arr(clip)
        self._neg_clip = -self._clip
        self._perm = None if perm is None else (perm if self.xp is np else self._arr(perm, self.xp.long))
        self.ctx = None if default_q is None else TermContext(default_q=self._arr(default_q))

    def _own(self, a):
        """a in this builder's dtype (and device): a itself where it is already (no op dispatched)."""
        if self.xp is np:
            return a if isinstance(a, np.ndarray) and a.dtype == self.dtype else self._arr(a)
        return a if a.dtype is self.dtype and a.device == self.device else self._arr(a)

    @property
    def dim(self) -> int:
        return self.spec.dim

    def terms(self, state: RobotState) -> dict:
        """Raw (unscaled) terms {name: [N, dim]} of the layout from a robot state."""
        if self.ctx is None:
            raise ObservationError("ObservationBuilder was built without default_q: pass the spec's default pose")
        return compute_terms(self.names, state, self.ctx)

    def frame(self, values: dict):
        """Scaled, clipped, concatenated current frame. [N, frame_dim]"""
        np_path = self.xp is np
        parts = []
        start = 0
        buf = np.empty((self.num_envs, self.spec.frame_dim), dtype=self.dtype) if np_path else None
        for name, dim in zip(self.names, self.dims):
            v = values.get(name)
            if v is None:
                raise ObservationError(f"observation term '{name}' missing (got terms {sorted(values)})")
            if v.ndim != 2 or v.shape[1] != dim:
                raise ObservationError(f"observation term '{name}' has shape {tuple(v.shape)}, "
                                       f"the robot spec says [num_envs, {dim}]")
            if np_path:  # the robot: write each term into one buffer (a few microseconds per tick)
                buf[:, start:start + dim] = v
                start += dim
            else:
                parts.append(self._own(v))
        if np_path:
            np.multiply(buf, self._scale, out=buf)
            np.minimum(buf, self._clip, out=buf)
            return np.maximum(buf, self._neg_clip, out=buf)
        raw = self.xp.concatenate(parts, axis=-1)
        return self.xp.clip(raw * self._scale, self._neg_clip, self._clip)

    def reset(self, env_ids=None) -> None:
        """Mark envs whose history restarts: the next frame fills their whole history."""
        if self.H == 1:  # one frame: nothing to refill
            return
        if env_ids is None:
            self._fresh[:] = True
        else:
            self._fresh[env_ids] = True

    def compute(self, values: dict):
        """Push the current frame of raw terms into the history; return the observation [N, obs_dim]."""
        return self.push(self.frame(values))

    def compute_state(self, state: RobotState):
        """RobotState -> observation [N, obs_dim] (terms, scale, clip, history)."""
        return self.push(self.frame(self.terms(state)))

    def peek(self, fr, owned: bool = False):
        """The observation push(fr) would return, leaving the history as it is: a finished episode's
        final observation, read before its env resets. [N, obs_dim]"""
        fr = self._own(fr)
        if self.H == 1:
            return fr if owned else self._flat(fr[:, None, :])
        hist = self.xp.concatenate([self.history[:, 1:], fr[:, None, :]], axis=1)  # [N, H, frame], rolled
        if self._fresh.any():
            hist[self._fresh] = fr[self._fresh][:, None, :]
        flat = hist.reshape(self.num_envs, -1)  # hist is new: no copy needed
        return flat if self._perm is None else flat[:, self._perm]

    def push(self, fr, owned: bool = False):
        """Push an already built frame [N, frame_dim]; return the observation [N, obs_dim].

        owned: fr is a new array that its caller hands over and never updates in place (the simulator's
        noisy frame). With one frame of history the observation is then fr itself, not a copy (push and
        peek replace a one-frame history, never update it in place)."""
        if self.H == 1:  # the history is the frame: nothing to roll or refill
            fr = self._own(fr)
            self.history = fr[:, None, :]  # [N, 1, frame]
            return fr if owned else self._flat(self.history)
        self.history = self.xp.roll(self.history, -1, 1)
        self.history[:, -1] = fr
        if self._fresh.any() if self.xp is not np else np.count_nonzero(self._fresh):
            self.history[self._fresh] = fr[self._fresh][:, None, :]
            self._fresh[:] = False
        return self._flat(self.history)

    def _flat(self, hist):
        """[N, H, frame] -> a new [N, obs_dim] array in the layout's order: the caller keeps it across steps,
        while the history (or the frame it came from) may be updated in place."""
        flat = hist.reshape(self.num_envs, -1)
        return (flat + 0) if self._perm is None else flat[:, self._perm]

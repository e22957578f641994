"""Simulator backends: `mujoco` (CPU, MuJoCo C engine via rollout) and `warp` (MuJoCo Warp)."""

from s2r.sim.backends.base import RANDOMIZABLE_FIELDS, Backend

__all__ = ["Backend", "RANDOMIZABLE_FIELDS"]

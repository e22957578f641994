"""s2r: sim-to-real robot learning.

Subpackages (folders at the repository root, mapped by pyproject's package-dir):
  s2r.sim           robots, tasks, batched environments, simulator backends
  s2r.control       runtime shared by sim and robot (spec, observations, actions, IK)
  s2r.policies      RL algorithms, replay, trainer, export
  s2r.world_models  diffusion world models for safe finetuning
"""

import os as _os

# MuJoCo picks its OpenGL backend at first import: default to headless EGL when there is
# no display, so offscreen rendering works on servers and CI (override with MUJOCO_GL=...).
if not _os.environ.get("DISPLAY"):
    _os.environ.setdefault("MUJOCO_GL", "egl")
    if _os.environ["MUJOCO_GL"] == "egl":
        _os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

__version__ = "0.1.0"

"""s2r: sim-to-real robot learning.

Subpackages (folders at the repository root, mapped by pyproject's package-dir):
  s2r.sim           robots, tasks, batched environments, simulator backends
  s2r.control       runtime shared by sim and robot (spec, observations, actions, IK)
  s2r.policies      RL algorithms, replay, trainer, export
  s2r.world_models  diffusion world models for safe finetuning
"""

__version__ = "0.1.0"

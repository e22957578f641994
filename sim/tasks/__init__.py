"""Task registry: one place that maps task names to task classes.

`make_task("humanoid-walk", spec_path=None, overrides={...})` builds the task's
typed config (dataclass), applies overrides by field name (unknown names are an
error) and loads its robot spec.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from s2r.control.spec import RobotSpec
from s2r.sim.tasks.arm import ArmPick, ArmReach
from s2r.sim.tasks.base import Task, TaskConfig
from s2r.sim.tasks.humanoid_walk import HumanoidStand, HumanoidWalk
from s2r.sim.tasks.mjcf_locomotion import MjcfLocomotion

ROBOTS_DIR = Path(__file__).resolve().parent.parent / "robots"

TASKS: dict[str, type[Task]] = {
    "humanoid-walk": HumanoidWalk,
    "humanoid-stand": HumanoidStand,
    "arm-reach": ArmReach,
    "arm-pick": ArmPick,
    "mjcf-locomotion": MjcfLocomotion,
}


class UnknownTaskError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


def resolve_spec_path(path: str) -> Path:
    """A spec path as given, or relative to sim/robots/ (e.g. 'g1/g1.yaml')."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    q = ROBOTS_DIR / path
    if q.is_file():
        return q
    return p  # RobotSpec.load raises a clear 'not found'


def task_config(name: str, overrides: dict[str, Any] | None = None) -> TaskConfig:
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task '{name}'; known tasks: {sorted(TASKS)}")
    cfg = TASKS[name].Config()
    for key, value in (overrides or {}).items():
        if key not in {f.name for f in dataclasses.fields(cfg)}:
            raise UnknownTaskError(f"task '{name}' has no config field '{key}'")
        current = getattr(cfg, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            # a mapping for a nested config (e.g. randomization) replaces the fields it names, so a run's
            # config.yaml (plain data) can shift one parameter of the robot
            unknown = set(value) - {f.name for f in dataclasses.fields(current)}
            if unknown:
                raise UnknownTaskError(f"task '{name}' config '{key}' has no field(s) {sorted(unknown)}")
            value = dataclasses.replace(current, **value)
        setattr(cfg, key, value)
    return cfg


def make_task(name: str, spec_path: str | None = None, overrides: dict[str, Any] | None = None) -> Task:
    cfg = task_config(name, overrides)
    if spec_path is not None:
        cfg.spec = spec_path
    if not cfg.spec:
        raise UnknownTaskError(f"task '{name}' needs a robot spec: pass --spec PATH.yaml")
    spec = RobotSpec.load(resolve_spec_path(cfg.spec))
    return TASKS[name](cfg, spec)


__all__ = ["TASKS", "make_task", "task_config", "resolve_spec_path", "Task", "TaskConfig"]

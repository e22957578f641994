"""Environment overrides: the EnvConfig keyword overrides that shift a task (a target robot for
finetuning, a shifted robot for a correction session), from Python or from `--env-override KEY=VALUE`."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml


def merge_overrides(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """EnvConfig keyword overrides: `extra` on top of `base`, mappings merged key by key (task_overrides,
    and the randomization mapping inside it)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_overrides(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def yaml_value(text: str) -> Any:
    """A KEY=VALUE setting's VALUE: YAML, except that '3e-5' is a number (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_env_overrides(items: list[str], task: str) -> dict[str, Any]:
    """`KEY=VALUE` strings (the CLI's --env-override) -> EnvConfig keyword overrides for `task`.

    KEY: an EnvConfig field (episode_length_s=5), a task config field (min_base_height=0.5), or a field
    of a nested task config (randomization.friction=0.4, randomization.push_velocity=0.5). VALUE is YAML;
    a single number for a (low, high) range fixes it: randomization.motor_strength=0.75 -> [0.75, 0.75]."""
    from s2r.sim.env import EnvConfig
    from s2r.sim.tasks import task_config

    env_fields = {f.name for f in dataclasses.fields(EnvConfig)} - {"task", "num_envs", "task_overrides"}
    tcfg = task_config(task)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--env-override takes KEY=VALUE (e.g. randomization.friction=0.4), got {item!r}")
        try:
            value = yaml_value(text)
        except yaml.YAMLError:
            raise ValueError(f"--env-override {item!r}: the value is not YAML") from None
        path = key.split(".")
        if len(path) == 1 and key in env_fields:
            out[key] = value
            continue
        node: Any = tcfg
        for name in path:
            if not dataclasses.is_dataclass(node) or name not in {f.name for f in dataclasses.fields(node)}:
                raise ValueError(f"--env-override {key}: no such field; use an EnvConfig field "
                                 f"({sorted(env_fields)}), a field of task '{task}' or randomization.FIELD")
            node = getattr(node, name)
        if isinstance(node, tuple) and len(node) == 2 and isinstance(value, (int, float)):
            value = [value, value]  # a fixed value for a (low, high) range
        d = out.setdefault("task_overrides", {})
        for name in path[:-1]:
            d = d.setdefault(name, {})
        d[path[-1]] = value
    return out

"""Domain randomisation: per-env model parameters drawn at each env reset.

Ranges live in `RandomizationConfig` (part of a task's config). Draws come from
one seeded torch.Generator owned by the env, so a run is reproducible by seed.
Scales multiply the MJCF's nominal values; (1, 1) disables a term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mujoco
import numpy as np
import torch


@dataclass
class RandomizationConfig:
    enabled: bool = True
    friction: tuple[float, float] = (0.5, 1.25)  # scale on every geom's sliding friction
    mass_scale: tuple[float, float] = (0.9, 1.1)  # per-body scale of mass (inertia follows)
    com_offset: float = 0.02  # m, uniform +- per axis, base body centre of mass
    kp_scale: tuple[float, float] = (0.9, 1.1)  # PD stiffness scale, per joint
    kd_scale: tuple[float, float] = (0.9, 1.1)  # PD damping scale, per joint
    motor_strength: tuple[float, float] = (0.9, 1.1)  # scales actuator output and torque limit
    joint_friction: tuple[float, float] = (0.5, 1.5)  # scale on dof frictionloss
    armature: tuple[float, float] = (0.9, 1.1)  # scale on dof armature
    latency_steps: tuple[int, int] = (0, 1)  # action delay in physics steps, inclusive
    obs_noise: dict[str, float] = field(default_factory=dict)  # term -> uniform noise amplitude
    push_interval_s: tuple[float, float] = (5.0, 15.0)
    push_velocity: float = 0.0  # m/s, uniform +- on base xy velocity; 0 disables pushes


# the model-scale terms, (low, high) each; (1, 1) leaves the term nominal
SCALE_FIELDS = ("friction", "mass_scale", "kp_scale", "kd_scale", "motor_strength", "joint_friction", "armature")


def parse_model_shift(text: str) -> dict[str, float]:
    """'motor_strength=0.8, mass_scale=1.1' -> {field: scale}: one robot that differs from the model by
    fixed scales (the ROS sim bridge's stand-in for a real robot). ValueError naming a bad entry."""
    out: dict[str, float] = {}
    for item in (t.strip() for t in text.replace(" ", ",").split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("randomization.")
        if not sep or key not in SCALE_FIELDS:
            raise ValueError(f"model shift {item!r}: expected FIELD=SCALE with FIELD one of {list(SCALE_FIELDS)}")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"model shift {item!r}: the scale is not a number") from None
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"model shift {item!r}: the scale must be a finite number > 0")
        out[key] = v
    return out


def fixed_shift_overrides(shift: dict[str, float]) -> dict:
    """Task overrides for a deterministic robot: every randomisation term off (no noise, pushes or delay)
    except the given scales, fixed at their value for every env and every reset."""
    r: dict = {f: [1.0, 1.0] for f in SCALE_FIELDS}
    r.update(com_offset=0.0, latency_steps=[0, 0], obs_noise={}, push_velocity=0.0, enabled=True)
    r.update({k: [v, v] for k, v in shift.items()})
    return {"randomization": r}


def _uniform(gen: torch.Generator, draws: list[tuple[float, float, tuple[int, ...]]]) -> list[np.ndarray]:
    """Arrays uniform in [lo, hi) of the given shapes, for draws = [(lo, hi, shape), ...], from ONE torch
    draw of the env's generator: torch's CPU rand fills serially, so these are the numbers of one draw per
    shape in this order. numpy arithmetic: the same float64 values as torch's, without its per-op dispatch
    on these few-row arrays."""
    sizes = [math.prod(shape) for _, _, shape in draws]
    u = torch.rand(sum(sizes), generator=gen, dtype=torch.float64).numpy()
    out, start = [], 0
    for (lo, hi, shape), n in zip(draws, sizes):
        out.append(lo + (hi - lo) * u[start:start + n].reshape(shape))
        start += n
    return out


def index_or_slice(idx: np.ndarray) -> np.ndarray | slice:
    """idx as a slice where it is a run of consecutive indices (numpy then scales a view in place
    instead of gathering and scattering a copy), else idx."""
    idx = np.asarray(idx)
    if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
        return slice(int(idx[0]), int(idx[0]) + len(idx))
    return idx


class ModelRandomizer:
    """Draws per-env model parameters from the config around the nominal model."""

    def __init__(self, cfg: RandomizationConfig, model: mujoco.MjModel, joint_act: np.ndarray,
                 joint_dof: np.ndarray, base_body: int | None):
        self.cfg = cfg
        self.m = model
        self.nj = len(joint_act)
        self.act = index_or_slice(joint_act)  # actuators of the spec joints
        self.dof = index_or_slice(joint_dof)
        self.base_body = base_body
        self.nominal = {f: np.array(getattr(model, f)) for f in (
            "geom_friction", "body_mass", "body_ipos", "body_inertia", "actuator_gainprm",
            "actuator_biasprm", "actuator_forcerange", "dof_frictionloss", "dof_armature")}

    @property
    def active(self) -> bool:
        c = self.cfg
        ranges = (getattr(c, f) for f in SCALE_FIELDS)
        return c.enabled and (any(lo != 1.0 or hi != 1.0 for lo, hi in ranges) or c.com_offset > 0)

    def sample(self, k: int, gen: torch.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Returns (model params for backend.set_params, summary scalars per env)."""
        c, nom = self.cfg, self.nominal
        nj, nbody = self.nj, self.m.nbody
        shift_com = self.base_body is not None and c.com_offset > 0
        draws = [(*c.friction, (k, 1)), (*c.mass_scale, (k, nbody))]
        draws += [(-c.com_offset, c.com_offset, (k, 3))] if shift_com else []
        draws += [(*r, (k, nj)) for r in (c.kp_scale, c.kd_scale, c.motor_strength, c.joint_friction, c.armature)]
        fr, mass, *com_shift, kp, kd, strength, jf, arm = _uniform(gen, draws)
        mass[:, 0] = 1.0
        com = np.zeros((k, nbody, 3))
        if shift_com:
            com[:, self.base_body] = com_shift[0]

        p = {  # ndarray.repeat: np.repeat's result without its Python wrapper
            "geom_friction": nom["geom_friction"][None].repeat(k, 0),
            "body_mass": nom["body_mass"][None] * mass,
            "body_inertia": nom["body_inertia"][None] * mass[..., None],
            "body_ipos": nom["body_ipos"][None] + com,
            "actuator_gainprm": nom["actuator_gainprm"][None].repeat(k, 0),
            "actuator_biasprm": nom["actuator_biasprm"][None].repeat(k, 0),
            "actuator_forcerange": nom["actuator_forcerange"][None].repeat(k, 0),
            "dof_frictionloss": nom["dof_frictionloss"][None].repeat(k, 0),
            "dof_armature": nom["dof_armature"][None].repeat(k, 0),
        }
        p["geom_friction"][..., 0] *= fr
        a = self.act
        kp_strength = kp * strength
        p["actuator_gainprm"][:, a, 0] *= kp_strength
        p["actuator_biasprm"][:, a, 1] *= kp_strength
        p["actuator_biasprm"][:, a, 2] *= kd * strength
        p["actuator_forcerange"][:, a, :] *= strength[..., None]
        p["dof_frictionloss"][:, self.dof] *= jf
        p["dof_armature"][:, self.dof] *= arm
        # means as sum / n: np.mean's own arithmetic, without its Python overhead
        summary = {"friction": fr[:, 0], "mass_scale": mass[:, 1:].sum(1) / (nbody - 1),
                   "strength": strength.sum(1) / nj}
        return p, summary

"""Domain randomisation: per-env model parameters drawn at each env reset.

Ranges live in `RandomizationConfig` (part of a task's config). Draws come from
one seeded torch.Generator owned by the env, so a run is reproducible by seed.
Scales multiply the MJCF's nominal values; (1, 1) disables a term.
"""

from __future__ import annotations

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


def _u(gen: torch.Generator, lo: float, hi: float, shape) -> np.ndarray:
    # torch draws (the env's generator), numpy arithmetic: the same float64 values, without two
    # torch op dispatches per draw on these few-row arrays
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64).numpy()


def _columns(idx: np.ndarray) -> np.ndarray | slice:
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
        self.act = _columns(joint_act)  # actuators of the spec joints
        self.dof = _columns(joint_dof)
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
        nj = self.nj
        fr = _u(gen, *c.friction, (k, 1))
        mass = _u(gen, *c.mass_scale, (k, self.m.nbody))
        mass[:, 0] = 1.0
        com = np.zeros((k, self.m.nbody, 3))
        if self.base_body is not None and c.com_offset > 0:
            com[:, self.base_body] = _u(gen, -c.com_offset, c.com_offset, (k, 3))
        kp = _u(gen, *c.kp_scale, (k, nj))
        kd = _u(gen, *c.kd_scale, (k, nj))
        strength = _u(gen, *c.motor_strength, (k, nj))
        jf = _u(gen, *c.joint_friction, (k, nj))
        arm = _u(gen, *c.armature, (k, nj))

        p = {
            "geom_friction": np.repeat(nom["geom_friction"][None], k, 0),
            "body_mass": nom["body_mass"][None] * mass,
            "body_inertia": nom["body_inertia"][None] * mass[..., None],
            "body_ipos": nom["body_ipos"][None] + com,
            "actuator_gainprm": np.repeat(nom["actuator_gainprm"][None], k, 0),
            "actuator_biasprm": np.repeat(nom["actuator_biasprm"][None], k, 0),
            "actuator_forcerange": np.repeat(nom["actuator_forcerange"][None], k, 0),
            "dof_frictionloss": np.repeat(nom["dof_frictionloss"][None], k, 0),
            "dof_armature": np.repeat(nom["dof_armature"][None], k, 0),
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
        summary = {"friction": fr[:, 0], "mass_scale": mass[:, 1:].mean(1), "strength": strength.mean(1)}
        return p, summary

"""Observation terms: the one definition of every name a robot spec may list in `observation.terms`.

Each term is a small function of a `RobotState` (what the robot measures or is told, in spec
joint order, batched `[N, ...]`) and the spec's constants. The same function runs on numpy
arrays in the ROS policy node (N = 1) and on torch tensors in the batched simulator, so
training and deployment cannot compute a term differently. `RobotSpec.validate` refuses a
term that is not registered here, or whose dim does not fit the robot.

    term               needs (RobotState fields)    value
    base_ang_vel       base_ang_vel                 body-frame angular velocity (gyro), rad/s  [3]
    projected_gravity  base_quat                    gravity direction in the body frame        [3]
    velocity_command   velocity_command             vx, vy (m/s), yaw rate (rad/s)            [3]
    joint_pos          q                            q - default pose                           [nj]
    joint_vel          qd                           joint velocities                           [nj]
    last_action        last_action                  the previous policy action                 [action_dim]
    base_height        base_height                  base height above the ground, m            [1]
    base_lin_vel       base_quat, base_lin_vel      body-frame linear velocity, m/s            [3]
    ee_pos             ee_pos                       end-effector position (arm base frame)     [3]
    gripper_opening    gripper_opening              gripper actuator length, m                 [1]
    target_rel         goal, ee_pos                 goal minus end effector                    [3]
    cube_rel           object_pos, ee_pos           object minus end effector                  [3]
    cube_target_rel    goal, object_pos             goal minus object                          [3]

numpy only here (torch tensors pass through the same code; see control/arrays.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from s2r.control.arrays import Array
from s2r.control.rotations import projected_gravity, quat_rotate_inverse


@dataclass
class RobotState:
    """What the observation terms read, batched [N, ...]; None where this robot has no such input."""

    q: Array | None = None  # [N, nj] joint positions, spec order
    qd: Array | None = None  # [N, nj] joint velocities
    base_quat: Array | None = None  # [N, 4] (w, x, y, z) base orientation in the world (IMU)
    base_ang_vel: Array | None = None  # [N, 3] body-frame angular velocity (gyro)
    base_lin_vel: Array | None = None  # [N, 3] world-frame linear velocity (a state estimator's)
    base_height: Array | None = None  # [N, 1] m
    velocity_command: Array | None = None  # [N, 3] vx, vy, yaw rate
    last_action: Array | None = None  # [N, action_dim]
    ee_pos: Array | None = None  # [N, 3] end effector, arm base frame
    gripper_opening: Array | None = None  # [N, 1]
    goal: Array | None = None  # [N, 3] target position (arm base frame)
    object_pos: Array | None = None  # [N, 3] manipulated object (arm base frame)
    # [N, 3] projected_gravity(base_quat) where the caller has computed it already (the simulator, for its
    # terminations and rewards); None: the term computes it from base_quat
    projected_gravity: Array | None = None


STATE_FIELDS = tuple(f.name for f in fields(RobotState))


@dataclass(frozen=True)
class TermContext:
    """Spec constants a term may need, as arrays of the state's namespace."""

    default_q: Array  # [nj] default joint pose


@dataclass(frozen=True)
class Term:
    name: str
    needs: tuple[str, ...]  # RobotState fields
    dim: Callable  # (RobotSpec) -> int: the dim the spec must declare
    fn: Callable[[RobotState, TermContext], Array]  # -> [N, dim]


TERMS: dict[str, Term] = {}


def _term(name: str, needs: tuple[str, ...], dim: Callable):
    def register(fn):
        TERMS[name] = Term(name, needs, dim, fn)
        return fn
    return register


def _three(spec) -> int:
    return 3


def _one(spec) -> int:
    return 1


def _nj(spec) -> int:
    return spec.num_joints


def _na(spec) -> int:
    return spec.action_dim


@_term("base_ang_vel", ("base_ang_vel",), _three)
def base_ang_vel(s: RobotState, c: TermContext) -> Array:
    return s.base_ang_vel


@_term("projected_gravity", ("base_quat",), _three)
def gravity(s: RobotState, c: TermContext) -> Array:
    return projected_gravity(s.base_quat) if s.projected_gravity is None else s.projected_gravity


@_term("velocity_command", ("velocity_command",), _three)
def velocity_command(s: RobotState, c: TermContext) -> Array:
    return s.velocity_command


@_term("joint_pos", ("q",), _nj)
def joint_pos(s: RobotState, c: TermContext) -> Array:
    return s.q - c.default_q


@_term("joint_vel", ("qd",), _nj)
def joint_vel(s: RobotState, c: TermContext) -> Array:
    return s.qd


@_term("last_action", ("last_action",), _na)
def last_action(s: RobotState, c: TermContext) -> Array:
    return s.last_action


@_term("base_height", ("base_height",), _one)
def base_height(s: RobotState, c: TermContext) -> Array:
    return s.base_height


@_term("base_lin_vel", ("base_quat", "base_lin_vel"), _three)
def base_lin_vel(s: RobotState, c: TermContext) -> Array:
    return quat_rotate_inverse(s.base_quat, s.base_lin_vel)


@_term("ee_pos", ("ee_pos",), _three)
def ee_pos(s: RobotState, c: TermContext) -> Array:
    return s.ee_pos


@_term("gripper_opening", ("gripper_opening",), _one)
def gripper_opening(s: RobotState, c: TermContext) -> Array:
    return s.gripper_opening


@_term("target_rel", ("goal", "ee_pos"), _three)
def target_rel(s: RobotState, c: TermContext) -> Array:
    return s.goal - s.ee_pos


@_term("cube_rel", ("object_pos", "ee_pos"), _three)
def cube_rel(s: RobotState, c: TermContext) -> Array:
    return s.object_pos - s.ee_pos


@_term("cube_target_rel", ("goal", "object_pos"), _three)
def cube_target_rel(s: RobotState, c: TermContext) -> Array:
    return s.goal - s.object_pos


def required_inputs(term_names) -> list[str]:
    """RobotState fields a layout needs, in STATE_FIELDS order (what a robot must measure)."""
    need = {f for n in term_names for f in TERMS[n].needs}
    return [f for f in STATE_FIELDS if f in need]


def compute_terms(term_names, state: RobotState, ctx: TermContext) -> dict[str, Array]:
    """{name: [N, dim]} for the named terms; a missing input is a ValueError naming term and field."""
    out = {}
    for name in term_names:
        t = TERMS.get(name)
        if t is None:
            raise ValueError(f"unknown observation term '{name}' (known: {sorted(TERMS)})")
        for f in t.needs:
            if getattr(state, f) is None:
                raise ValueError(f"observation term '{name}' needs robot state '{f}', which is not available")
        out[name] = t.fn(state, ctx)
    return out

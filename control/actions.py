"""Action processing shared by sim and robot: policy action -> actuator commands.

Policy actions live in [-1, 1] (tanh-squashed). One definition per action mode
(robot spec `action.type`), written for numpy (robot) and torch (simulation) alike:

  joint_position  target = clip(default + scale * a, joint range); the PD law (MuJoCo's
                  position actuators in simulation, the drives on the robot) makes torque
  joint_torque    tau = clip(scale * a, +-torque_limit)
  ee_delta        a[:3] * scale is an end-effector position step; damped-least-squares IK
                  (control/ik.py) integrates it into joint position targets, holding the
                  start orientation of the end effector; a[3] (if the spec has a gripper)
                  sets the gripper command between closed (-1) and open (+1)

`ActionProcessor` holds the per-joint constants; `EeDeltaController` also holds the
integrated joint targets (state). The sim tasks (sim/tasks/) and the ROS policy node
(s2r/ros/policy_node.py) both call these, never their own copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from s2r.control.arrays import Array, asarray_like, clip, namespace
from s2r.control.ik import dls, hinge_jacobian
from s2r.control.rotations import quat_error
from s2r.control.safety import target_window
from s2r.control.spec import RobotSpec

_BIG = 1e6


class ActionProcessor:
    """Per-joint constants of the spec as arrays of one namespace (numpy by default).

    device: None for numpy; a torch device (or "cpu"/"cuda") for torch tensors.
    """

    def __init__(self, spec: RobotSpec, device=None, dtype=None):
        self.spec = spec
        rng = np.array([j.range for j in spec.joints], dtype=np.float64)
        values = {
            "default": np.array(spec.array("default")),
            "lower": np.maximum(rng[:, 0], -_BIG),
            "upper": np.minimum(rng[:, 1], _BIG),
            "torque_limit": np.minimum(np.array(spec.array("torque_limit")), _BIG),
            "scale": np.array(spec.action_scale_vector()),
            "kp": np.array(spec.array("kp")),
            "kd": np.array(spec.array("kd")),
        }
        if device is None:
            dt = dtype or np.float64
            for k, v in values.items():
                setattr(self, k, v.astype(dt))
        else:
            import torch

            dt = dtype or torch.float32
            for k, v in values.items():
                setattr(self, k, torch.as_tensor(v, dtype=dt, device=device))
        # [nj] each: default, lower, upper, torque_limit, kp, kd; scale: [nj] or [3] (ee_delta)

    def joint_targets(self, action: Array) -> Array:
        """[N, nj] in [-1, 1] -> joint position targets [N, nj] within the joint range."""
        q = self.default + self.scale * clip(action, -1.0, 1.0)
        return clip(q, self.lower, self.upper)

    def joint_torques(self, action: Array) -> Array:
        """[N, nj] -> direct torques [N, nj], clipped to the torque limit."""
        tau = self.scale * clip(action, -1.0, 1.0)
        return clip(tau, -self.torque_limit, self.torque_limit)


def pd_torque(q_target: Array, q: Array, qd: Array, kp: Array, kd: Array, torque_limit: Array) -> Array:
    """tau = kp (q* - q) - kd qd, clipped to +-torque_limit. Same law as MuJoCo's position servo."""
    tau = kp * (q_target - q) - kd * qd
    return clip(tau, -torque_limit, torque_limit)


@dataclass
class EeDeltaConfig:
    workspace_low: tuple[float, float, float] = (0.15, -0.6, 0.0)  # m: IK targets are clamped to this box
    workspace_high: tuple[float, float, float] = (0.85, 0.6, 0.8)
    ik_damping: float = 0.05  # lambda of the damped least squares
    ik_rot_weight: float = 0.5  # weight of the hold-orientation error in the same solve
    # The robot's safety filter (control/safety.py) lets a target move at most velocity_limit x control_dt per
    # step and keeps it position_margin x range inside each joint's limits; the IK applies the same limits, so
    # a policy trained in simulation asks for nothing the robot will refuse (and the filter rarely fires).
    velocity_scale: float = 1.0  # fraction of the spec's velocity limits per control step
    position_margin: float = 0.02  # fraction of each joint's range kept clear at both ends


class EeDeltaController:
    """ee_delta actions -> joint position targets and a gripper command, for N arms.

    State: q_cmd [N, nj], the integrated joint targets (reset to the measured pose at the
    start of an episode / when the policy takes over). Kinematic inputs come from the
    caller: the sim reads them from MuJoCo sensors, the robot from control/kinematics.py.
    """

    def __init__(self, spec: RobotSpec, cfg: EeDeltaConfig | None = None, proc: ActionProcessor | None = None):
        if spec.action.type != "ee_delta":
            raise ValueError(f"robot spec '{spec.name}': EeDeltaController needs action.type ee_delta, "
                             f"got '{spec.action.type}'")
        self.spec, self.cfg = spec, cfg or EeDeltaConfig()
        self.proc = proc or ActionProcessor(spec)
        g = spec.action.gripper
        self.gripper_open, self.gripper_closed = (g.open, g.closed) if g else (0.0, 0.0)
        self.has_gripper = g is not None
        like = self.proc.default
        self.ee_scale = self.proc.scale  # [3] m per unit action
        self.ws_lo = asarray_like(self.cfg.workspace_low, like)
        self.ws_hi = asarray_like(self.cfg.workspace_high, like)
        q_lo, q_hi = target_window(spec, self.cfg.position_margin)  # the safety filter's own window
        self.q_lo, self.q_hi = asarray_like(q_lo, like), asarray_like(q_hi, like)  # [nj]
        vmax = np.array(spec.array("velocity_limit")) * self.cfg.velocity_scale * spec.control_dt
        self.max_step = asarray_like(np.minimum(vmax, 1e6), like)  # [nj] rad per control step
        self.q_cmd = self.proc.default[None, :] + 0.0  # [N, nj]; reset() sizes it

    def reset(self, q: Array, env_ids: Array | None = None) -> None:
        """Start integrating from joint positions q ([N, nj], or [k, nj] for env_ids)."""
        q = asarray_like(q, self.proc.default)  # same namespace, dtype and device as the constants
        if env_ids is None:
            self.q_cmd = clip(q, self.q_lo, self.q_hi)
        else:
            self.q_cmd[env_ids] = clip(q, self.q_lo, self.q_hi)

    def executed(self, q_target: Array) -> None:
        """The joint targets actually sent ([N, nj]) after a safety filter clipped them: the integrator
        continues from there (anti-windup). Without it, q_cmd runs away from a rate- or torque-limited
        target and the arm drifts to its joint limits instead of reaching the goal."""
        self.q_cmd = asarray_like(q_target, self.proc.default) + 0.0

    def desired_ee(self, action: Array, ee_pos: Array) -> Array:
        """The end-effector position this action asks for, clamped to the workspace. [N, 3]"""
        return clip(ee_pos + self.ee_scale * clip(action[:, :3], -1.0, 1.0), self.ws_lo, self.ws_hi)

    def joint_targets(self, action: Array, ee_pos: Array, ee_quat: Array, ee_quat_hold: Array,
                      anchors: Array, axes: Array) -> Array:
        """One IK step. action [N, 3 or 4]; ee_pos [N, 3], ee_quat [N, 4] measured; ee_quat_hold [N, 4]
        the orientation to keep; anchors, axes [N, nj, 3] world joint anchors and axes.
        Returns the new q_cmd [N, nj] (joint position targets within the joint range)."""
        xp = namespace(action, ee_pos)
        err = xp.concatenate([self.desired_ee(action, ee_pos) - ee_pos,
                              self.cfg.ik_rot_weight * quat_error(ee_quat_hold, ee_quat)], axis=1)
        dq = dls(hinge_jacobian(anchors, axes, ee_pos), err, self.cfg.ik_damping)
        dq = clip(dq, -self.max_step, self.max_step)
        self.q_cmd = clip(self.q_cmd + dq, self.q_lo, self.q_hi)
        return self.q_cmd

    def gripper_command(self, action: Array) -> Array | None:
        """[N] gripper actuator command (spec units: open .. closed), or None without a gripper channel."""
        if not self.has_gripper or action.shape[1] < 4:
            return None
        frac = (clip(action[:, 3], -1.0, 1.0) + 1.0) * 0.5
        return self.gripper_closed + frac * (self.gripper_open - self.gripper_closed)

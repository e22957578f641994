"""Damped-least-squares inverse kinematics for hinge chains, batched, numpy or torch.

The Jacobian of a hinge chain is assembled from each joint's world anchor and
axis. The simulator reads them from MuJoCo sensors; the robot computes them with
MuJoCo's kinematics on the robot's MJCF (control/kinematics.py). Both then call
the same functions here, so an end-effector action means the same joint motion
in simulation and on the robot.
"""

from __future__ import annotations

from s2r.control.arrays import Array, cross, eye_like, namespace


def hinge_jacobian(anchors: Array, axes: Array, point: Array) -> Array:
    """Geometric Jacobian of `point` w.r.t. hinge joints.

    anchors: [N, n, 3] joint positions (world), axes: [N, n, 3] unit joint axes (world),
    point: [N, 3]. Returns J: [N, 6, n] (rows 0-2 linear, 3-5 angular).
    """
    xp = namespace(anchors, axes, point)
    lin = cross(axes, point[:, None, :] - anchors)  # [N, n, 3]
    return xp.swapaxes(xp.concatenate([lin, axes], axis=-1), 1, 2)


def dls(jac: Array, err: Array, damping: float = 0.05) -> Array:
    """dq = J^T (J J^T + lambda^2 I)^-1 err.  jac: [N, m, n], err: [N, m] -> dq: [N, n]."""
    xp = namespace(jac, err)
    jt = xp.swapaxes(jac, 1, 2)  # [N, n, m]
    jjt = jac @ jt
    y = xp.linalg.solve(jjt + (damping ** 2) * eye_like(jac.shape[1], jac), err[..., None])
    return (jt @ y)[..., 0]

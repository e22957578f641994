"""Batched quaternion helpers for numpy (robot) and torch (simulation). Quaternions are (w, x, y, z),
as MuJoCo stores them.

All functions take and return arrays with a leading batch dimension: `q: [N, 4]`, `v: [N, 3]`;
the namespace follows the inputs (control/arrays.py).
"""

from __future__ import annotations

import numpy as np

from s2r.control.arrays import Array, constant_like, cross, namespace, stack_last


def quat_conj(q: Array) -> Array:
    xp = namespace(q)
    return xp.concatenate([q[..., :1], -q[..., 1:]], axis=-1)


def quat_mul(a: Array, b: Array) -> Array:
    xp = namespace(a, b)
    aw, ax, ay, az = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
    bw, bx, by, bz = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return xp.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], axis=-1)


def _rotate(w: Array, u: Array, v: Array) -> Array:
    """v rotated by the unit quaternion (w [N, 1], u [N, 3]): v + w t + u x t, with t = 2 u x v."""
    t = 2.0 * cross(u, v)
    return v + w * t + cross(u, t)


def quat_rotate(q: Array, v: Array) -> Array:
    """Rotate v by q (body -> world when q is the body orientation)."""
    return _rotate(q[..., :1], q[..., 1:], v)


def quat_rotate_inverse(q: Array, v: Array) -> Array:
    """Rotate v by q^-1 (world -> body). _rotate with the conjugate's vector part -u, whose sign moves out
    of both cross products: t = -2 u x v, v + w t - u x t (negation is exact: the same numbers, no -u built)."""
    w, u = q[..., :1], q[..., 1:]
    t = -2.0 * cross(u, v)
    return v + w * t - cross(u, t)


def projected_gravity(q: Array) -> Array:
    """Unit gravity direction in the body frame: (0, 0, -1) when upright. [N, 3]

    R^T (0, 0, -1) written out (the third row of R, negated): no temporary gravity array.
    """
    if namespace(q) is not np and q.ndim == 2:
        return _projected_gravity_columns(q)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return stack_last([-2.0 * (x * z - w * y), -2.0 * (y * z + w * x), 2.0 * (x * x + y * y) - 1.0])


def _projected_gravity_columns(q: Array) -> Array:
    """projected_gravity of q [N, 4] (torch) as whole-column products: the same numbers in 7 tensor ops
    instead of 17 (the simulator's step pays per op, not per element).

        a * b           = (xz, yz, xx)        c * d = (wy, wx, yy)
        s = a b + c d (-1, 1, 1)              = (xz - wy, yz + wx, xx + yy)
        g = s (-2, -2, 2) + (-0, -0, -1)

    Scaling by -1 and +-2 is exact and -0 adds nothing (it keeps a -0), so each addcmul rounds once, as
    the written-out form's single add or subtract does: the results are bit-identical.
    """
    n, xp = q.shape[0], namespace(q)
    cols = q.index_select(1, constant_like(_GRAVITY_COLUMNS, q, dtype=xp.long))  # [N, 12]: a, b, c, d
    a, b, c, d = cols.view(n, 4, 3).unbind(1)  # [N, 3] each
    s = (a * b).addcmul_(c * d, constant_like((-1.0, 1.0, 1.0), q))
    return constant_like((-0.0, -0.0, -1.0), q).addcmul(s, constant_like((-2.0, -2.0, 2.0), q))


# q's columns (w, x, y, z) = (0, 1, 2, 3) for a, b, c, d above
_GRAVITY_COLUMNS = (1, 2, 1, 3, 3, 1, 0, 0, 2, 2, 1, 2)


def yaw_from_quat(q: Array) -> Array:
    xp = namespace(q)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return xp.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def quat_from_yaw(yaw: Array) -> Array:
    xp = namespace(yaw)
    half = 0.5 * yaw
    z = xp.zeros_like(yaw)
    return xp.stack([xp.cos(half), z, z, xp.sin(half)], axis=-1)


def quat_mul_yaw(yaw: Array, q: Array) -> Array:
    """quat_mul(quat_from_yaw(yaw), q): q turned by yaw [N] about the world z axis. [N, 4]

    With the yaw quaternion (c, 0, 0, s) the product is c q + s (-z, -y, x, w): the same numbers as
    quat_mul's (its zero terms add nothing) in 8 array operations instead of about 40 (a reset of a
    few envs pays per operation, not per element).
    """
    xp = namespace(yaw, q)
    half = 0.5 * yaw[..., None]
    return quat_turn_z(xp.cos(half), xp.sin(half), q)


def quat_turn_z(c: Array, s: Array, q: Array) -> Array:
    """quat_mul_yaw from the half yaw angle's cosine c and sine s ([N, 1] each): c q + s (-z, -y, x, w).
    For a caller whose cosine and sine come from elsewhere (the simulator's reset: torch's, on numpy rows)."""
    swapped = namespace(q).flip(q, (-1,)) * constant_like((-1.0, -1.0, 1.0, 1.0), q)  # (-z, -y, x, w)
    return c * q + s * swapped


def quat_error(q_target: Array, q: Array) -> Array:
    """Rotation vector (axis * angle, world frame) taking q to q_target. [N, 3]"""
    xp = namespace(q_target, q)
    dq = quat_mul(q_target, quat_conj(q))
    dq = xp.where(dq[..., :1] < 0, -dq, dq)  # shortest path
    v = dq[..., 1:]
    s = xp.sqrt((v * v).sum(-1, keepdims=True))
    angle = 2.0 * xp.arctan2(s, dq[..., :1])
    scale = xp.where(s > 1e-9, angle / xp.clip(s, 1e-9, None), 2.0 + 0.0 * s)
    return v * scale

"""Batched quaternion helpers for numpy (robot) and torch (simulation). Quaternions are (w, x, y, z),
as MuJoCo stores them.

All functions take and return arrays with a leading batch dimension: `q: [N, 4]`, `v: [N, 3]`;
the namespace follows the inputs (control/arrays.py).
"""

from __future__ import annotations

from s2r.control.arrays import Array, asarray_like, cross, namespace, stack_last


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
    """Rotate v by q^-1 (world -> body): the conjugate's vector part is -u, no conjugate built."""
    return _rotate(q[..., :1], -q[..., 1:], v)


def projected_gravity(q: Array) -> Array:
    """Unit gravity direction in the body frame: (0, 0, -1) when upright. [N, 3]

    R^T (0, 0, -1) written out (the third row of R, negated): no temporary gravity array.
    """
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return stack_last([-2.0 * (x * z - w * y), -2.0 * (y * z + w * x), 2.0 * (x * x + y * y) - 1.0])


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
    half = 0.5 * yaw
    c, s = xp.cos(half)[..., None], xp.sin(half)[..., None]
    swapped = q[..., [3, 2, 1, 0]] * asarray_like([-1.0, -1.0, 1.0, 1.0], q)  # (-z, -y, x, w)
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

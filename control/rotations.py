"""Batched quaternion helpers in torch. Quaternions are (w, x, y, z), as MuJoCo stores them.

All functions take and return tensors with a leading batch dimension: `q: [N, 4]`, `v: [N, 3]`.
"""

from __future__ import annotations

import torch


def quat_conj(q: torch.Tensor) -> torch.Tensor:
    return torch.cat([q[..., :1], -q[..., 1:]], dim=-1)


def quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)


def quat_rotate(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate v by q (body -> world when q is the body orientation)."""
    w = q[..., :1]
    u = q[..., 1:]
    t = 2.0 * torch.cross(u, v, dim=-1)
    return v + w * t + torch.cross(u, t, dim=-1)


def quat_rotate_inverse(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate v by q^-1 (world -> body)."""
    return quat_rotate(quat_conj(q), v)


def projected_gravity(q: torch.Tensor) -> torch.Tensor:
    """Unit gravity direction in the body frame: (0, 0, -1) when upright. [N, 3]"""
    g = torch.zeros(q.shape[:-1] + (3,), dtype=q.dtype, device=q.device)
    g[..., 2] = -1.0
    return quat_rotate_inverse(q, g)


def yaw_from_quat(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = q.unbind(-1)
    return torch.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def quat_from_yaw(yaw: torch.Tensor) -> torch.Tensor:
    half = 0.5 * yaw
    z = torch.zeros_like(yaw)
    return torch.stack([torch.cos(half), z, z, torch.sin(half)], dim=-1)


def quat_error(q_target: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotation vector (axis * angle, world frame) taking q to q_target. [N, 3]"""
    dq = quat_mul(q_target, quat_conj(q))
    dq = torch.where(dq[..., :1] < 0, -dq, dq)  # shortest path
    v = dq[..., 1:]
    s = v.norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(s, dq[..., :1])
    scale = torch.where(s > 1e-9, angle / s.clamp_min(1e-9), torch.full_like(s, 2.0))
    return v * scale

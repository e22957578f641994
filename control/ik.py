"""Damped-least-squares inverse kinematics, batched in torch.

The Jacobian of a hinge chain is assembled from each joint's world anchor and
axis (which the simulator reads from MuJoCo sensors, and which equals MuJoCo's
`mj_jacSite` for hinge joints); the robot side can feed the same function from
its own kinematics.
"""

from __future__ import annotations

import torch


def hinge_jacobian(anchors: torch.Tensor, axes: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Geometric Jacobian of `point` w.r.t. hinge joints.

    anchors: [N, n, 3] joint positions (world), axes: [N, n, 3] unit joint axes (world),
    point: [N, 3]. Returns J: [N, 6, n] (rows 0-2 linear, 3-5 angular).
    """
    lin = torch.cross(axes, point.unsqueeze(1) - anchors, dim=-1)  # [N, n, 3]
    return torch.cat([lin, axes], dim=-1).transpose(1, 2)


def dls(jac: torch.Tensor, err: torch.Tensor, damping: float = 0.05) -> torch.Tensor:
    """dq = J^T (J J^T + lambda^2 I)^-1 err.  jac: [N, m, n], err: [N, m] -> dq: [N, n]."""
    m = jac.shape[1]
    jjt = jac @ jac.transpose(1, 2)
    eye = torch.eye(m, dtype=jac.dtype, device=jac.device)
    y = torch.linalg.solve(jjt + (damping ** 2) * eye, err.unsqueeze(-1))
    return (jac.transpose(1, 2) @ y).squeeze(-1)

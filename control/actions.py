"""Action processing shared by sim and robot: policy action -> actuator commands.

Policy actions live in [-1, 1] (tanh-squashed). For joint-position robots the
target is default_pose + scale * action, clipped to the joint range; the PD law
(in MuJoCo's actuators in simulation, in the drives or `pd_torque` on a
torque-controlled robot) turns it into torque.
"""

from __future__ import annotations

import torch

from s2r.control.spec import RobotSpec


class ActionProcessor:
    def __init__(self, spec: RobotSpec, device: str | torch.device = "cpu", dtype=torch.float32):
        self.spec = spec
        t = lambda x: torch.as_tensor(x, device=device, dtype=dtype)  # noqa: E731
        self.default = t(spec.array("default"))  # [nj]
        lo_hi = torch.as_tensor([j.range for j in spec.joints], dtype=torch.float64)
        self.lower = t(lo_hi[:, 0].clamp_min(-1e6))
        self.upper = t(lo_hi[:, 1].clamp_max(1e6))
        self.torque_limit = t([min(j.torque_limit, 1e6) for j in spec.joints])
        self.scale = t(spec.action_scale_vector())
        self.kp = t(spec.array("kp"))
        self.kd = t(spec.array("kd"))

    def joint_targets(self, action: torch.Tensor) -> torch.Tensor:
        """[N, nj] in [-1, 1] -> joint position targets [N, nj] within the joint range."""
        q = self.default + self.scale * action.clamp(-1.0, 1.0)
        return torch.maximum(torch.minimum(q, self.upper), self.lower)

    def joint_torques(self, action: torch.Tensor) -> torch.Tensor:
        """[N, nj] -> direct torques [N, nj], clipped to the torque limit."""
        tau = self.scale * action.clamp(-1.0, 1.0)
        return torch.maximum(torch.minimum(tau, self.torque_limit), -self.torque_limit)


def pd_torque(q_target: torch.Tensor, q: torch.Tensor, qd: torch.Tensor, kp: torch.Tensor,
              kd: torch.Tensor, torque_limit: torch.Tensor) -> torch.Tensor:
    """tau = kp (q* - q) - kd qd, clipped to +-torque_limit. Same law as MuJoCo's position servo."""
    tau = kp * (q_target - q) - kd * qd
    return torch.maximum(torch.minimum(tau, torque_limit), -torque_limit)

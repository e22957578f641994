"""Backend parity: step two BatchedEnvs of one task (e.g. `warp` against the C engine `mujoco`) with the
same actions from the same state, and measure how far their physics and observations drift apart.

Used by tests/test_warp_backend.py (Warp's CPU device) and bench/gpu_check.py (CUDA). The reference
env `ref` is the C engine in float64; `env` may live on another device (its tensors are moved to the
reference's device before comparing).

Two ways to run the same action sequence:
  free-running   both envs advance on their own: differences compound through the dynamics, and a
                 contact that changes state (stick/slip, touchdown) one step apart can part the
                 trajectories entirely (see tests/test_warp_backend.py for when that happens);
  one step       (`one_step=True`) before every control step `env` is set to `ref`'s qpos/qvel, so
                 each step's difference is the per-step model error alone, bounded by round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from s2r.sim.env import BatchedEnv


@dataclass
class Deviation:
    """Largest |env - ref| over envs, components and control steps."""

    qpos: float
    qvel: float
    sensordata: float  # relative to 1 + |ref|: touch sensors read hundreds of newtons
    obs: float  # policy observation
    steps: int  # control steps compared
    done_mismatch_step: int | None  # first step whose terminated/truncated differ; None: all agreed


@torch.no_grad()
def compare_envs(env: BatchedEnv, ref: BatchedEnv, steps: int, seed: int = 0, action: str = "random",
                 one_step: bool = False) -> Deviation:
    """Reset both with `seed`, then `steps` control steps of the same actions (action: "random",
    uniform in [-1, 1] from a generator seeded with `seed`, or "zero")."""
    if (env.num_envs, env.action_dim) != (ref.num_envs, ref.action_dim):
        raise ValueError(f"envs differ: {env.num_envs} envs x {env.action_dim} actions against "
                         f"{ref.num_envs} x {ref.action_dim}")
    if action not in ("random", "zero"):
        raise ValueError(f"action must be 'random' or 'zero', got {action!r}")
    n, dev = ref.num_envs, ref.backend.qpos.device
    env.reset(seed=seed)
    ref.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    worst = dict(qpos=0.0, qvel=0.0, sensordata=0.0, obs=0.0)
    mismatch = None
    for k in range(steps):
        if one_step:  # start this step from the reference's state
            env.backend.reset_envs(torch.arange(n), ref.backend.qpos.clone(), ref.backend.qvel.clone())
        a = torch.rand(n, env.action_dim, generator=gen) * 2 - 1 if action == "random" else torch.zeros(
            n, env.action_dim)  # [N, action_dim]
        obs, _, term, trunc, _ = env.step(a)
        obs_ref, _, term_ref, trunc_ref, _ = ref.step(a)
        if mismatch is None and not (torch.equal(term.to(dev), term_ref) and torch.equal(trunc.to(dev), trunc_ref)):
            mismatch = k
        b, rb = env.backend, ref.backend
        sd = rb.sensordata  # [N, nsensordata] (arm tasks declare none: kinematics come from qpos)
        now = dict(qpos=(b.qpos.to(dev, torch.float64) - rb.qpos).abs().max().item(),
                   qvel=(b.qvel.to(dev, torch.float64) - rb.qvel).abs().max().item(),
                   sensordata=((b.sensordata.to(dev, torch.float64) - sd).abs() / (1 + sd.abs())).max().item()
                   if sd.numel() else 0.0,
                   obs=(obs["policy"].to(obs_ref["policy"].device) - obs_ref["policy"]).abs().max().item())
        worst = {key: _max_nan(worst[key], v) for key, v in now.items()}
    return Deviation(**worst, steps=steps, done_mismatch_step=mismatch)


def _max_nan(a: float, b: float) -> float:
    """max that keeps a NaN (Python's max(0.0, nan) is 0.0: a NaN state would read as parity)."""
    return a if a != a or (b == b and a >= b) else b

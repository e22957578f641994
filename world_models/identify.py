"""System identification with a world model: which values of the simulator's randomised-physics terms
(the task's `sim_only_critic_terms`: friction, mass scale, motor strength on the G1 tasks) explain a
robot's data best?

A model trained on sim rollouts whose state holds those terms (randomised over a range that covers the
robot) has learned how they change the dynamics. Set the terms of real windows to candidate values and
score the model's one-step prediction of the rest of the state; the best candidate is the estimate.
Coordinate descent over a grid inside the range the model saw (state_lo .. state_hi: it cannot
extrapolate), the same sampler noise for every candidate (common random numbers), so differences come
from the terms alone. An estimate on the edge of the range means the robot lies outside what the model
has seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from s2r.world_models.data import Transitions, windows
from s2r.world_models.diffusion import DiffusionWorldModel, WorldModelError
from s2r.world_models.train import _nrmse


@dataclass
class Identified:
    value: Tensor  # [c] the estimate of each column
    error: float  # one-step error (RMSE over the other dims, in data stds) at the estimate
    error_start: float  # ... at the starting values
    on_edge: Tensor  # [c] bool: the estimate sits on the edge of the model's range


@torch.no_grad()
def identify_terms(model: DiffusionWorldModel, data: Transitions, columns: Tensor, start: Tensor, grid: int = 9,
                   sweeps: int = 2, max_windows: int = 2048, steps: int = 3, seed: int = 0) -> Identified:
    """columns [c] long: state dims to identify; start [c]: their starting values (e.g. the pretraining
    mean). -> the values that minimise the model's one-step error on `data` (windows of k steps).
    A plain model only: a sim-prior model's simulator is identified by identify_physics."""
    if grid < 2 or sweeps < 1:
        raise ValueError(f"identification needs grid >= 2 and sweeps >= 1, got {grid}, {sweeps}")
    states, actions, nxt, *_ = windows(data, model.cfg.history)  # [M, k, S], [M, k, A], [M, S]
    if len(states) == 0:
        raise WorldModelError(f"identification: no window of {model.cfg.history} steps in the data")
    pick = torch.linspace(0, len(states) - 1, min(max_windows, len(states))).long()
    states, actions, nxt = states[pick], actions[pick], nxt[pick]
    keep = nxt.std(0) > 1e-6  # [S] scored: dims that vary in the data (as train.state_scale) ...
    keep[columns] = False  # ... other than the ones being identified
    std = nxt.std(0).clamp_min(1e-8)  # [S] scale of each dim (as train.state_scale)
    lo, hi = model.state_lo[columns].float(), model.state_hi[columns].float()  # [c] what the model has seen

    def error(value: Tensor) -> float:
        s = states.clone()
        s[:, :, columns] = value
        pred = model.predict(s, actions, steps=steps, generator=torch.Generator().manual_seed(seed)).next_state
        return float(_nrmse(pred, nxt, std, keep).mean())

    value = torch.minimum(torch.maximum(start.float().clone(), lo), hi)
    best = err0 = error(value)
    for _ in range(sweeps):
        for j in range(len(columns)):
            for v in torch.linspace(float(lo[j]), float(hi[j]), grid):
                cand = value.clone()
                cand[j] = v
                e = error(cand)
                if e < best:
                    best, value = e, cand
    span = (hi - lo).clamp_min(1e-9)
    on_edge = ((value - lo) / span < 1e-3) | ((hi - value) / span < 1e-3)
    return Identified(value, best, err0, on_edge)


# ---- the simulator's own physics (a sim-prior model) ---------------------------------------------
@dataclass
class IdentifiedPhysics:
    value: dict[str, float]  # the estimated scale of each field
    error: float  # the simulator's one-step error at the estimate (per-row RMSE in data stds, mean over rows)
    error_start: float  # ... at the starting scales
    on_edge: list[str]  # fields whose estimate sits on the edge of the searched range


@torch.no_grad()
def identify_physics(sim, data: Transitions, fields: tuple[str, ...] = ("motor_strength", "mass_scale", "friction"),
                     start: dict[str, float] | None = None, lo: float = 0.5, hi: float = 1.5, grid: int = 7,
                     tol: float = 0.005, max_evals: int = 120, max_rows: int = 1024,
                     prior_weight: float = 0.01) -> IdentifiedPhysics:
    """sim: a sim_prior.SimPrior (its physics is left at the estimate); data: transitions of the robot.
    -> the model scales (RandomizationConfig fields) under which the simulator's next state from each
    measured (state, action) is closest to the measured one. A coarse sweep of `grid` values over [lo, hi] per
    field, then Hooke-Jeeves pattern search (moves of +-h per field, a pattern move along each improvement,
    h halved down to `tol`): the pattern move follows valleys where fields trade off (motor strength against
    mass). The objective adds prior_weight x mean(log(scale)^2), a pull toward the nominal model: where the
    data cannot tell (along such a valley a robot with latency and pushes moves the error by a few
    thousandths), the estimate stays near it instead of drifting from one call's start to the next. The
    simulator is deterministic, so no common random numbers are needed; it extrapolates, so the range may lie
    far outside what a learned model saw."""
    if grid < 3 or not 0 < lo < hi or not 0 < tol or max_evals < 1 or not prior_weight >= 0:
        raise ValueError(f"physics identification needs grid >= 3, 0 < lo < hi, tol > 0, max_evals >= 1 and "
                         f"prior_weight >= 0, got {grid}, {lo}, {hi}, {tol}, {max_evals}, {prior_weight}")
    if len(data) == 0:
        raise WorldModelError("physics identification: no transitions in the data")
    pick = torch.linspace(0, len(data) - 1, min(max_rows, len(data))).long()
    state, action, nxt = data.state[pick], data.action[pick], data.next_state[pick]
    std = nxt.std(0).clamp_min(1e-8)  # [S]
    keep = nxt.std(0) > 1e-6  # [S] scored: dims that vary, other than those the simulator copies or is told
    for at, dim in sim.carried:
        keep[at:at + dim] = False
    at, dim = sim.layout["last_action"]
    keep[at:at + dim] = False
    seen: dict[tuple, float] = {}  # x -> the simulator's one-step error

    def clip(x: tuple) -> tuple:
        return tuple(round(min(max(v, lo), hi), 6) for v in x)

    def error(x: tuple) -> float:  # x: a scale per field -> the objective
        x = clip(x)
        if x not in seen:
            sim.set_physics(dict(zip(fields, x)))
            seen[x] = float(_nrmse(sim.predict(state, action), nxt, std, keep).mean())
        return seen[x] + prior_weight * sum(math.log(v) ** 2 for v in x) / len(x)

    def explore(x: tuple, h: float) -> tuple:  # +-h along each field in turn, keeping what improves
        for j in range(len(fields)):
            for d in (h, -h):
                y = clip(x[:j] + (x[j] + d,) + x[j + 1:])
                if error(y) < error(x):
                    x = y
                    break
        return x

    x = clip(tuple(float((start or {}).get(f, 1.0)) for f in fields))
    error(x)
    err0 = seen[x]
    for j in range(len(fields)):  # 1. coarse sweep
        for v in torch.linspace(lo, hi, grid).tolist():
            y = clip(x[:j] + (v,) + x[j + 1:])
            if error(y) < error(x):
                x = y
    h = (hi - lo) / (grid - 1) / 2  # 2. pattern search
    while h >= tol and len(seen) < max_evals:
        y = explore(x, h)
        if error(y) >= error(x):
            h /= 2
            continue
        while len(seen) < max_evals:  # pattern moves: keep going the way that improved (x -> y)
            z = explore(clip(tuple(2 * b - a for a, b in zip(x, y))), h)
            if error(z) >= error(y):
                break
            x, y = y, z
        x = y
    best = x
    sim.set_physics(dict(zip(fields, best)))
    span = hi - lo
    on_edge = [f for f, v in zip(fields, best) if (v - lo) / span < 1e-3 or (hi - v) / span < 1e-3]
    return IdentifiedPhysics(dict(zip(fields, best)), seen[best], err0, on_edge)

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
                   sweeps: int = 2, max_windows: int = 2048, steps: int = 3, seed: int = 0, sim=None) -> Identified:
    """columns [c] long: state dims to identify; start [c]: their starting values (e.g. the pretraining
    mean). -> the values that minimise the model's one-step error on `data` (windows of k steps).
    sim: a sim-prior model's SimPrior (the terms are carried over by it, so its states are computed once)."""
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
    prior = sim.predict(states[:, -1], actions[:, -1]) if sim is not None else None  # [M, S]

    def error(value: Tensor) -> float:
        s = states.clone()
        s[:, :, columns] = value
        if prior is not None:  # the simulator carries the terms over from the state: the same value
            prior[:, columns] = value
        pred = model.predict(s, actions, steps=steps, generator=torch.Generator().manual_seed(seed),
                             prior=prior).next_state
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

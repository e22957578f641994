"""Imagination as an environment: a learned world model behind the batched-env contract
(policies/env_protocol.py: BatchedEnvProtocol), so the unchanged SAC/DSAC-T trainer explores in it.

The state the model steps is the critic observation of the task (clean frame + privileged terms such as
the base height); the policy observation is its frame part (through an ObservationBuilder, so a spec's
history is rebuilt). A model trained on recordings (policy observation only) uses the frame as both.

Step order (one imagined step, all envs at once):
    0. policy observation                 the state's frame (+ the target's observation noise, as the
                                          simulator draws it: uniform, per term; the critic reads it clean)
    1. validate the action                [N, A], finite
    2. sample the model                   (s', r, terminated) from the last k states + actions, `samples`
                                          draws: the first is the step, their spread is u [N] (an ensemble:
                                          one draw per member, their disagreement is u); a sim-prior
                                          model corrects the simulator's next state (sim_prior.py), one
                                          MuJoCo step per env first (a randomised prior: one robot of the
                                          task's randomisation per env, a new one per rollout, pushed as
                                          in training)
    3. NaN / exploding predictions        halted (terminated, reward 0, final_obs = last good state), counted
    4. last_action term                   set from the action (known exactly, not predicted)
    5. clamp to the data's state range    model.state_lo / state_hi (counted where a state left it by over a
                                          tenth of the range)
    6. safe set                           base height, attitude (projected gravity) -> terminated (a fall:
                                          bootstrap 0), as LIFT's threshold termination; a joint beyond the
                                          spec's range + margin -> truncated (the robot's stops do not let it
                                          get there: the model left the physical states, not a fall)
    7. uncertainty gate                   u > u_max -> truncated (the model does not know: cut the rollout
                                          without claiming a fall), as MOReL's halt
    8. reward                             r - lambda u
    9. finished envs                      info["final_obs"]; restart from a new real start window

Start states are real: windows of k steps drawn from the data the env is given (held-out or new target
data), never from the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from s2r.control.observations import ObservationBuilder
from s2r.control.spec import RobotSpec
from s2r.world_models.data import Transitions, windows
from s2r.world_models.diffusion import DiffusionWorldModel, WorldModelError


@dataclass
class ImaginedEnvConfig:
    horizon: int = 20  # imagined steps before truncation (LIFT ramps 1 -> 20)
    sampling_steps: int = 3  # sampler steps per prediction (DIAMOND: 3)
    solver: str = "euler"
    samples: int = 4  # draws per step for u; 1: u = 0 (no penalty, no gate); an ensemble model: one per member
    penalty: float = 1.0  # lambda in r - lambda u (MOPO: 0.5-5)
    u_max: float = 1.0  # u above this halts the rollout (units: std of the data's delta)
    explode_z: float = 50.0  # a predicted state this many data stds from the mean counts as exploding
    min_base_height: float | None = 0.45  # m; None: no height gate (humanoid-walk's fall height)
    max_tilt_cos: float | None = -0.5  # projected gravity z above this is a fall; None: no attitude gate
    # rad beyond the spec's joint range still counted safe: MuJoCo's soft limits (and a robot's compliant
    # stops) let joints pass it; the shifted G1's target data had 4.6 % of states beyond, by up to 0.058 rad
    joint_limit_margin: float = 0.05
    # term -> uniform noise amplitude (raw units) on the policy observation, as sim/randomization.py's
    # obs_noise: the policy learns in imagination with the sensor noise it will meet on the target
    obs_noise: dict[str, float] = field(default_factory=dict)

    def check(self) -> None:
        """WorldModelError naming the first setting that cannot work."""
        for name in ("horizon", "sampling_steps", "samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise WorldModelError(f"imagined-env setting {name} must be a whole number >= 1, got {v!r}")
        for name, lo, inf_ok in (("penalty", 0.0, False), ("u_max", 0.0, True), ("explode_z", None, False)):
            v = getattr(self, name)
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
            if not (number and (v >= lo if lo is not None else v > 0) and (inf_ok or math.isfinite(v))):
                need = (">= 0" if lo is not None else "> 0") + ("" if inf_ok else " and finite")
                raise WorldModelError(f"imagined-env setting {name} must be a number {need}, got {v!r}")


class ImaginedEnv:
    """BatchedEnvProtocol over a DiffusionWorldModel; see the module docstring for the step order."""

    def __init__(self, model: DiffusionWorldModel, starts: Transitions, num_envs: int, cfg: ImaginedEnvConfig,
                 spec: RobotSpec | None = None, seed: int = 0, sim=None):
        """sim: the SimPrior (world_models/sim_prior.py) a sim-prior model corrects; each step then asks it for
        the simulator's next state first."""
        if bool(getattr(model.cfg, "sim_prior", False)) != (sim is not None):
            raise WorldModelError("a sim-prior world model needs its simulator (sim=SimPrior), and only such a "
                                  "model takes one")
        if sim is not None and sim.randomize and sim.env.num_envs != num_envs:
            raise WorldModelError(f"a randomised sim prior needs one MuJoCo env per imagined env: it has "
                                  f"{sim.env.num_envs}, the imagined env {num_envs}")
        cfg.check()
        self.sim = sim
        spec = spec if spec is not None else starts.spec
        if spec is not None and starts.spec is not None and spec.hash() != starts.spec.hash():
            from s2r.control.spec import check_spec_hash

            check_spec_hash(starts.spec.hash(), spec, "the imagined env's start data")
        self.model, self.cfg, self.spec = model, cfg, spec
        k = model.cfg.history
        self.k = k
        self.set_starts(starts)  # refuses start data of another width
        self.num_envs, self.action_dim = num_envs, model.cfg.action_dim
        self.critic_obs_dim = model.cfg.state_dim
        self.max_episode_steps: int | None = cfg.horizon
        self.layout = starts.layout or {}
        self.gen = torch.Generator().manual_seed(seed)
        self.frame_dim = spec.observation.frame_dim if spec is not None and starts.obs_key == "critic" \
            else model.cfg.state_dim
        self.builder = (ObservationBuilder(spec.observation, num_envs, xp="torch")
                        if spec is not None and starts.obs_key == "critic" else None)
        self.obs_dim = self.builder.dim if self.builder is not None else model.cfg.state_dim
        self._noise_amp = self._noise_vector()  # [frame_dim] or None
        self._safe_set()
        self.hist_s = torch.zeros(num_envs, k, self.critic_obs_dim)  # [N, k, S]
        self.hist_a = torch.zeros(num_envs, k - 1, self.action_dim)  # [N, k-1, A]
        self.episode_step = torch.zeros(num_envs, dtype=torch.long)
        self.episode_return = torch.zeros(num_envs)
        self.counts = {"steps": 0, "halted_nan": 0, "halted_uncertain": 0, "unsafe": 0, "joint_limit": 0,
                       "model_terminated": 0, "clamped": 0}

    def set_starts(self, starts: Transitions) -> None:
        """The real data that rollouts start from (new target data each round of world_models/dyna.py);
        running rollouts go on, the next restarts draw from `starts`."""
        if starts.state.shape[1] != self.model.cfg.state_dim:
            raise WorldModelError(f"start data has states of width {starts.state.shape[1]}, the model "
                                  f"{self.model.cfg.state_dim}: they come from different observation layouts")
        s, a, *_ = windows(starts, self.k)
        if len(s) == 0:
            raise WorldModelError(f"no start window: the data has no episode with {self.k} steps of history")
        self._start_s, self._start_a = s, a[:, :-1]  # [M, k, S], [M, k-1, A]: the policy picks the k-th action

    def _noise_vector(self) -> Tensor | None:
        """[frame_dim] amplitude on the scaled policy frame (the spec's noise_amplitudes); None: no noise."""
        bad = {k: v for k, v in self.cfg.obs_noise.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise WorldModelError(f"obs_noise amplitudes must be finite and >= 0, got {bad}")
        amp = {k: float(v) for k, v in self.cfg.obs_noise.items() if v}
        if not amp:
            return None
        if self.builder is None:
            raise WorldModelError("obs_noise needs a robot spec and a model of the critic observation (the "
                                  "policy frame is built from it)")
        try:
            return torch.tensor(self.spec.observation.noise_amplitudes(amp), dtype=torch.float32)
        except ValueError as e:
            raise WorldModelError(str(e)) from None

    def _frame(self, state: Tensor) -> Tensor:
        """state [N, S] -> the policy frame [N, frame_dim] the policy reads: clean + amp (2u - 1)."""
        frame = state[:, : self.frame_dim]
        if self._noise_amp is None:
            return frame
        u = torch.empty(frame.shape).uniform_(-1, 1, generator=self.gen)
        return u.mul_(self._noise_amp).add_(frame)

    # ---- the safe set, from the state layout and the spec -----------------------------------
    def _safe_set(self) -> None:
        lay, spec = self.layout, self.spec
        self._height = lay.get("critic.base_height")
        self._gravity = lay.get("projected_gravity")
        self._joints = None
        if spec is not None and "joint_pos" in lay:
            term = next(t for t in spec.observation.terms if t.name == "joint_pos")
            n = term.dim
            lo = torch.tensor([j.range[0] for j in spec.joints[:n]]) - self.cfg.joint_limit_margin
            hi = torch.tensor([j.range[1] for j in spec.joints[:n]]) + self.cfg.joint_limit_margin
            default = torch.tensor(spec.array("default")[:n])
            self._joints = (lay["joint_pos"][0], n, term.scale, default, lo, hi)
        self._last_action = None
        if spec is not None and "last_action" in lay:
            term = next(t for t in spec.observation.terms if t.name == "last_action")
            self._last_action = (lay["last_action"][0], term.dim, term.scale, term.clip)

    def unsafe(self, state: Tensor) -> Tensor:
        """state [N, S] -> [N] bool: outside the safe set (fallen or beyond a joint limit)."""
        return self.fallen(state) | self.beyond_joint_limits(state)

    def fallen(self, state: Tensor) -> Tensor:
        """state [N, S] -> [N] bool: below the base height or past the attitude of a fall (the task's end)."""
        bad = torch.zeros(state.shape[0], dtype=torch.bool)
        c = self.cfg
        if self._height is not None and c.min_base_height is not None:
            bad |= state[:, self._height[0]] < c.min_base_height
        if self._gravity is not None and c.max_tilt_cos is not None:
            bad |= state[:, self._gravity[0] + 2] > c.max_tilt_cos
        return bad

    def beyond_joint_limits(self, state: Tensor) -> Tensor:
        """state [N, S] -> [N] bool: a joint past the spec's range by more than joint_limit_margin."""
        if self._joints is None:
            return torch.zeros(state.shape[0], dtype=torch.bool)
        at, n, scale, default, lo, hi = self._joints
        q = state[:, at:at + n] / scale + default  # joint_pos = (q - default) * scale
        return ((q < lo) | (q > hi)).any(1)

    # ---- the env contract -----------------------------------------------------------------
    def _observe(self, ids: Tensor | None = None) -> dict[str, Tensor]:
        s = self.hist_s[:, -1]  # [N, S]
        if self.builder is None:
            return {"policy": s.clone(), "critic": s.clone()}
        return {"policy": self.builder.push(self._frame(s)), "critic": s.clone()}

    def _restart(self, ids: Tensor) -> None:
        pick = torch.randint(0, len(self._start_s), (len(ids),), generator=self.gen)
        self.hist_s[ids] = self._start_s[pick]
        self.hist_a[ids] = self._start_a[pick]
        self.episode_step[ids] = 0
        self.episode_return[ids] = 0
        if self.builder is not None:
            self.builder.reset(ids)
        if self.sim is not None:  # a randomised sim prior: a new robot for each new rollout
            self.sim.reset_envs(ids)

    def reset(self, seed: int | None = None) -> dict[str, Tensor]:
        if seed is not None:
            self.gen.manual_seed(seed)
        self._restart(torch.arange(self.num_envs))
        return self._observe()

    def set_horizon(self, horizon: int) -> None:
        """Change the imagined rollout length (a horizon ramp); running rollouts keep their step count."""
        if horizon < 1:
            raise ValueError(f"imagined horizon must be >= 1, got {horizon}")
        self.cfg.horizon = self.max_episode_steps = int(horizon)

    @torch.no_grad()
    def step(self, action: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, dict[str, Any]]:
        N, c = self.num_envs, self.cfg
        action = torch.as_tensor(action, dtype=torch.float32).cpu()
        if action.shape != (N, self.action_dim):
            raise WorldModelError(f"action has shape {tuple(action.shape)}, expected [num_envs={N}, "
                                  f"action_dim={self.action_dim}]")
        if not torch.isfinite(action).all():
            raise WorldModelError("action contains NaN/Inf")
        action = action.clamp(-1, 1)
        acts = torch.cat([self.hist_a, action[:, None]], 1)  # [N, k, A]
        # 2 (a sim-prior model corrects the simulator's step from the same state and action)
        prior = self.sim.predict(self.hist_s[:, -1], action) if self.sim is not None else None
        p = self.model.predict(self.hist_s, acts, steps=c.sampling_steps, solver=c.solver, samples=c.samples,
                               generator=self.gen, prior=prior)
        nxt, reward = p.next_state, p.reward
        u = p.uncertainty if p.uncertainty is not None else torch.zeros(N)
        # 3
        m = self.model
        z = (nxt - m.state_mean) / m.state_std
        broken = ~torch.isfinite(nxt).all(1) | ~torch.isfinite(reward) | ~torch.isfinite(u) \
            | (z.abs() > c.explode_z).any(1)
        last = self.hist_s[:, -1]
        nxt = torch.where(broken[:, None], last, nxt)
        reward = torch.where(broken, torch.zeros_like(reward), reward)
        u = torch.where(broken, torch.zeros_like(u), u)
        # 4
        if self._last_action is not None:
            at, dim, scale, clip = self._last_action
            nxt[:, at:at + dim] = (action[:, :dim] * scale).clamp(-clip, clip)
        # 5
        clamped = torch.maximum(torch.minimum(nxt, m.state_hi), m.state_lo)
        # counted where a state left the range by over a tenth of it: constant dims (a command, held terms)
        # and small overshoots of bounded ones (contacts) are clamped on nearly every step and say nothing
        span = m.state_hi - m.state_lo  # [S]
        n_clamped = int(((clamped - nxt).abs() > 0.1 * span).logical_and(span > 0).any(1).sum())
        nxt = clamped
        # 6-7
        unsafe = self.fallen(nxt) & ~broken
        terminated = broken | unsafe | p.terminated
        joint_limit = self.beyond_joint_limits(nxt) & ~terminated
        uncertain = (u > c.u_max) & ~terminated if p.uncertainty is not None else torch.zeros(N, dtype=torch.bool)
        self.episode_step += 1
        truncated = (uncertain | joint_limit | (self.episode_step >= c.horizon)) & ~terminated
        # 8
        reward = reward - c.penalty * u
        self.episode_return += reward
        self.counts["steps"] += N
        self.counts["halted_nan"] += int(broken.sum())
        self.counts["unsafe"] += int(unsafe.sum())
        self.counts["joint_limit"] += int(joint_limit.sum())
        self.counts["model_terminated"] += int((p.terminated & ~broken & ~unsafe).sum())
        self.counts["halted_uncertain"] += int(uncertain.sum())
        self.counts["clamped"] += n_clamped
        # advance the history
        self.hist_s = torch.cat([self.hist_s[:, 1:], nxt[:, None]], 1)
        self.hist_a = acts[:, 1:]  # [N, k-1, A]: the actions before the new state's
        info: dict[str, Any] = {"uncertainty": u, "unsafe": unsafe, "joint_limit": joint_limit, "halted_nan": broken,
                                "uncertain": uncertain, "counts": dict(self.counts)}
        done = terminated | truncated
        if done.any():
            ids = done.nonzero().squeeze(-1)
            info["final_obs"] = {"policy": self._peek_policy(nxt), "critic": nxt.clone()}
            info["episode"] = {"return": self.episode_return[ids].clone(), "length": self.episode_step[ids].clone(),
                               "env_ids": ids}
            self._restart(ids)
        return self._observe(), reward, terminated, truncated, info

    def _peek_policy(self, state: Tensor) -> Tensor:
        """The policy observation of `state` without advancing the history (for final_obs)."""
        if self.builder is None:
            return state.clone()
        saved = self.builder.history.clone(), self.builder._fresh.clone()
        out = self.builder.push(self._frame(state))
        self.builder.history, self.builder._fresh = saved
        return out

    def close(self) -> None:
        if self.sim is not None:
            self.sim.close()

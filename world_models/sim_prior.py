"""The simulator as the world model's prior: the nominal MuJoCo model's next state for a measured state.

A diffusion model that learns a shifted robot's whole closed loop from scratch drifts over an episode
(docs/WORLD_MODELS.md: every policy fell in 250-step imagined rollouts, the target-trained one included).
Most of the physics is known, though: the simulator the policy was pretrained in. With a sim prior the
model learns only what the simulator gets wrong (weaker motors, a heavier body, latency, pushes), and
imagination steps

    s_sim' = SimPrior.predict(s, a)              the nominal simulator from the measured state s
    s'     = s_sim' + model sample (residual)    the diffusion model, conditioned on (s, a, s_sim' - s)

so a rollout stays as physical as the simulator, and the learned part is small (the residual's scale,
not the state's). "Neural-augmented simulation" (Golemo et al. 2018) with a diffusion residual.

The state is the task's critic observation (world_models/data.py); the task turns its raw terms back
into MuJoCo's qpos/qvel (`pose_from_terms`: base at the origin, heading 0). Per call:

    1. qpos, qvel from the state's terms; the last action (a term of the state) as the held control
    2. one control step of the unrandomised task with the action: no latency, pushes or sensor noise
       (those are the target's, for the residual to learn)
    3. the next critic observation (a fall's final observation where the task terminated); the terms
       that are not physics (the command, the randomised-physics summary) are carried over from s

`set_physics` moves the simulator itself toward the robot (fixed scales on motor strength, mass, friction,
as domain randomisation applies them); `identify.identify_physics` picks those scales from the robot's data
by the simulator's own one-step error. The simulator extrapolates where a learned model cannot, so a robot
outside the pretraining range is still found, and the residual left for the model shrinks.

With `randomize` (imagination, not the model's training data) each MuJoCo env is one robot of the task's
domain randomisation, centred on the physics set: model scales drawn per env, the base's centre of mass,
and the task's pushes, which the simulator integrates as it would in training. A policy trained in one
fixed identified robot learns that robot; the target is a family of them (its randomisation, its pushes).
`reset_envs` draws new ones when the imagined rollouts of those envs restart. A push adds its kick to the
next state's base velocity (x, y of the base frame: the world's for the upright, heading-0 pose the state
is rebuilt in), since the state is all the next step starts from. Latency stays out: the residual learned
it against the unrandomised simulator (which has none), so adding it here would count it twice. Rows of
`predict` map to envs by position, so a randomised prior steps exactly num_envs rows.

Training-side only (MuJoCo and torch), like the rest of world_models/.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from s2r.world_models.diffusion import WorldModelError

# terms of the state the simulator does not produce: carried over from the input state
CARRIED_TERMS = ("velocity_command", "critic.friction", "critic.mass_scale", "critic.strength")


@dataclass
class SimPriorConfig:
    task: str = "humanoid-stand"
    num_envs: int = 64  # MuJoCo envs stepped per chunk of rows
    task_overrides: dict[str, Any] = field(default_factory=dict)  # the nominal model's settings (not the target's)
    seed: int = 0


class SimPrior:
    """predict(state [B, S], action [B, A]) -> next state [B, S] of the simulator: the nominal model, at the
    physics set, or (randomize) one randomised, pushed robot per env."""

    def __init__(self, cfg: SimPriorConfig, layout: dict[str, list[int]], randomize: bool = False):
        from s2r.sim.env import BatchedEnv, EnvConfig
        from s2r.sim.overrides import merge_overrides

        self.cfg = cfg
        self.randomize = bool(randomize)
        overrides = dict(cfg.task_overrides)
        if self.randomize:  # no latency (the residual's) and no sensor noise (the critic state is clean)
            overrides = merge_overrides(overrides, {"randomization": {"latency_steps": [0, 0]}})
            overrides["randomization"]["obs_noise"] = {}
        self.env = BatchedEnv(EnvConfig(task=cfg.task, num_envs=cfg.num_envs, seed=cfg.seed,
                                        randomize=self.randomize, episode_length_s=1e9, nthread=1,
                                        task_overrides=overrides))
        self.task = self.env.task
        if not hasattr(self.task, "pose_from_terms"):
            raise WorldModelError(f"task '{cfg.task}' cannot be set to a measured state (it has no pose_from_terms); "
                                  f"a sim prior needs a floating-base humanoid task")
        need = ["base_ang_vel", "projected_gravity", "joint_pos", "joint_vel", "last_action",
                "critic.base_lin_vel", "critic.base_height"]
        missing = [k for k in need if k not in layout]
        if missing:
            raise WorldModelError(f"a sim prior needs the terms {missing} in the state (the critic observation of "
                                  f"a humanoid task); this state has {sorted(layout)}")
        if self.env.critic_obs_dim != sum(d for _, d in layout.values()):
            raise WorldModelError(f"the task's critic observation has {self.env.critic_obs_dim} dims, the model's "
                                  f"state {sum(d for _, d in layout.values())}: another task or robot")
        self.layout = layout
        self.scale = {t.name: t.scale for t in self.env.spec.observation.terms}
        self.carried = [layout[k] for k in CARRIED_TERMS if k in layout]
        self.physics: dict[str, float] = {}  # the model scales in use ({}: the nominal model)
        self.env.reset()

    def set_physics(self, physics: dict[str, float]) -> None:
        """Step a robot that differs from the nominal model by fixed scales, every env alike: fields of
        sim.randomization's RandomizationConfig, e.g. {"motor_strength": 0.8, "mass_scale": 1.1}, applied
        as domain randomisation applies them ({} restores the nominal model). A randomised prior multiplies
        the task's ranges of those fields by the scales instead, and draws every env anew."""
        from s2r.sim.randomization import SCALE_FIELDS, ModelRandomizer, RandomizationConfig, fixed_shift_overrides

        for k, v in physics.items():
            if k not in SCALE_FIELDS:
                raise WorldModelError(f"sim prior physics: unknown scale {k!r}; expected one of {list(SCALE_FIELDS)}")
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise WorldModelError(f"sim prior physics: {k} must be a finite number > 0, got {v!r}")
        env = self.env
        self.physics = {k: float(v) for k, v in physics.items()}
        if self.randomize:
            env.centre_randomization(self.physics)
            self.reset_envs(torch.arange(env.num_envs))
            return
        fixed = ModelRandomizer(RandomizationConfig(**fixed_shift_overrides(physics)["randomization"]), env.model,
                                env.index.joint_act, env.index.joint_dof, None)
        params, _ = fixed.sample(env.num_envs, torch.Generator().manual_seed(0))  # (v, v) ranges: no randomness
        env.backend.set_params(torch.arange(env.num_envs), params)

    def reset_envs(self, ids: Tensor) -> None:
        """New robots (model scales, centre of mass, push schedule) for the envs `ids` of a randomised prior;
        an unrandomised one has a single robot, so nothing changes."""
        if self.randomize:
            self.env.reset_envs(torch.as_tensor(ids, dtype=torch.long).reshape(-1))

    def _kick(self, nxt: Tensor) -> None:
        """The env's pushes of this step on the next states' base velocity [N, S], in place: the env put them
        into MuJoCo's velocities after it observed, and the next step rebuilds MuJoCo's state from nxt."""
        if self.env.last_pushes is None:
            return
        ids, kick = self.env.last_pushes  # [k], [k, 2] m/s
        at, _ = self.layout["critic.base_lin_vel"]
        nxt[ids, at:at + 2] += kick.to(nxt.dtype) * self.scale.get("critic.base_lin_vel", 1.0)

    def _terms(self, state: Tensor) -> dict[str, Tensor]:
        def raw(name: str) -> Tensor:
            at, dim = self.layout[name]
            return state[:, at:at + dim] / self.scale.get(name, 1.0)

        return {"base_ang_vel": raw("base_ang_vel"), "projected_gravity": raw("projected_gravity"),
                "joint_pos": raw("joint_pos"), "joint_vel": raw("joint_vel"),
                "base_lin_vel": raw("critic.base_lin_vel"), "base_height": raw("critic.base_height")}

    @torch.no_grad()
    def predict(self, state: Tensor, action: Tensor) -> Tensor:
        """state [B, S] (critic observations), action [B, A] in [-1, 1] -> the simulator's next state [B, S]."""
        if state.dim() != 2 or action.dim() != 2 or state.shape[0] != action.shape[0]:
            raise WorldModelError(f"sim prior: state must be [B, S] and action [B, A], got {tuple(state.shape)} and "
                                  f"{tuple(action.shape)}")
        out = torch.empty_like(state)
        N = self.env.num_envs
        if self.randomize and state.shape[0] != N:
            raise WorldModelError(f"a randomised sim prior steps one row per env (its robot), {N} rows; got "
                                  f"{state.shape[0]}")
        for lo in range(0, state.shape[0], N):
            s, a = state[lo:lo + N], action[lo:lo + N]
            k = s.shape[0]
            if k < N:  # pad the last chunk with copies of its first row
                s = torch.cat([s, s[:1].expand(N - k, -1)])
                a = torch.cat([a, a[:1].expand(N - k, -1)])
            out[lo:lo + k] = self._step(s, a)[:k]
        return out

    def _step(self, state: Tensor, action: Tensor) -> Tensor:
        env, N = self.env, self.env.num_envs
        ids = torch.arange(N)
        qpos, qvel = self.task.pose_from_terms(self._terms(state))
        env.backend.reset_envs(ids, qpos, qvel)
        at, dim = self.layout["last_action"]
        last = state[:, at:at + dim].clamp(-1, 1).contiguous()
        env.action = last.clone()
        env.ctrl = self.task.process_action(last).to(torch.float64)
        self.task.refresh()
        obs, _, _, _, info = env.step(action.clamp(-1, 1).contiguous())
        nxt = obs["critic"].clone()
        if "final_obs" in info:  # a fall: the terminal state, not the reset one
            done = torch.zeros(N, dtype=torch.bool)
            done[info["episode"]["env_ids"]] = True
            nxt[done] = info["final_obs"]["critic"][done]
        for at, dim in self.carried:
            nxt[:, at:at + dim] = state[:, at:at + dim]
        if self.randomize:
            self._kick(nxt)
        return nxt

    def close(self) -> None:
        self.env.close()


# ---- with the model's checkpoint ----------------------------------------------------------------
PAYLOAD_KEY = "sim_prior"


def sim_prior_extra(cfg: SimPriorConfig) -> dict:
    """The checkpoint entry (save_world_model's extra) that rebuilds the simulator with the model."""
    return {PAYLOAD_KEY: json.dumps(dataclasses.asdict(cfg))}


def sim_prior_from_payload(payload: dict, layout: dict[str, list[int]], num_envs: int,
                           randomize: bool = False) -> SimPrior:
    """The SimPrior a sim-prior model was trained against, num_envs MuJoCo envs per chunk (randomize: one
    randomised robot per env, for imagination)."""
    text = payload.get(PAYLOAD_KEY)
    if not text:
        raise WorldModelError("this world model corrects a simulator (sim_prior) but its file does not say which "
                              "(no 'sim_prior' entry); retrain it with `s2r wm train --sim-prior`")
    cfg = SimPriorConfig(**json.loads(text))
    return SimPrior(dataclasses.replace(cfg, num_envs=num_envs), layout, randomize=randomize)

"""Batched environment: torch tensors `[num_envs, ...]` in and out, per-env auto-reset.

Step order (one control step; the only place it is written down):

    1. validate the action                      [N, action_dim], finite, in shape
    2. task.process_action -> ctrl              [N, nu] (scale, default pose, IK, clip)
    3. latency + zero-order hold -> ctrl_seq    [N, decimation, nu]
    4. backend.step(ctrl_seq)                   physics x decimation, all envs at once
    5. task.update()                            contacts, air time, commands
    6. events                                   pushes (velocity kicks)
    7. terminations                             task (falls) | diverged; truncation by time limit
    8. rewards                                  sum of weighted task terms
    9. final observations of finished envs      kept in info["final_obs"] for bootstrapping
   10. reset finished envs                      new state, randomised model, new command
   11. observations                             policy (noisy, history) and critic (privileged)

`terminated` (a real MDP end: bootstrap with 0) is kept apart from `truncated`
(time limit: bootstrap from info["final_obs"]). The observation returned for a
finished env is already the first observation of its next episode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from s2r.control.observations import ObservationBuilder
from s2r.control.spec import RobotSpec
from s2r.sim.model import compile_model
from s2r.sim.randomization import ModelRandomizer

BACKENDS = ("mujoco", "warp")


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. numpy on the CPU: torch's isfinite is four kernels plus all()."""
    return bool(np.isfinite(t.numpy()).all()) if t.device.type == "cpu" else bool(torch.isfinite(t).all())


def _float32(t: torch.Tensor) -> torch.Tensor:
    """t as float32, itself where it is already (most reward terms): no op dispatched."""
    return t if t.dtype is torch.float32 else t.float()


class EnvError(ValueError):
    """Bad env configuration or bad input to step(); the message names the problem."""


@dataclass
class EnvConfig:
    task: str = "humanoid-walk"
    num_envs: int = 16
    backend: str = "mujoco"  # mujoco (CPU, default) | warp (MuJoCo Warp: CUDA or Warp's CPU device)
    device: str = "cpu"  # torch device of observations/rewards (warp: also the Warp device)
    seed: int = 0
    nthread: int | None = None  # mujoco backend threads; default: all cores
    spec: str | None = None  # robot spec YAML overriding the task's
    randomize: bool | None = None  # None: the task's default
    episode_length_s: float | None = None  # None: the task's default
    max_qvel: float = 1e3  # rad/s or m/s: beyond this an env counts as diverged
    joint_torque_sensors: bool = False  # sensordata "jnt_torque:<joint>": applied actuator torque (sim bridge)
    task_overrides: dict[str, Any] = field(default_factory=dict)  # task config fields


class BatchedEnv:
    def __init__(self, cfg: EnvConfig):
        from s2r.sim.tasks import make_task

        if not isinstance(cfg.num_envs, int) or cfg.num_envs <= 0:
            raise EnvError(f"num_envs must be a positive integer, got {cfg.num_envs!r}")
        if cfg.backend not in BACKENDS:
            raise EnvError(f"unknown backend '{cfg.backend}'; choose one of {BACKENDS}")
        self.cfg = cfg
        self.num_envs = cfg.num_envs
        self.device = torch.device(cfg.device)
        self.task = make_task(cfg.task, spec_path=cfg.spec, overrides=cfg.task_overrides)
        if cfg.randomize is not None:
            self.task.cfg.randomization = replace(self.task.cfg.randomization, enabled=cfg.randomize)
        if cfg.episode_length_s is not None:
            self.task.cfg.episode_length_s = cfg.episode_length_s
        self.spec: RobotSpec = self.task.spec
        self.model, self.index = compile_model(self.spec, self.task.sensors(),
                                               joint_torque_sensors=cfg.joint_torque_sensors)
        self.decimation = self.spec.decimation
        self.control_dt = self.spec.control_dt
        self.max_episode_steps = max(1, int(math.ceil(self.task.cfg.episode_length_s / self.control_dt)))
        self.backend = self._make_backend()
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.rand_cfg = self.task.cfg.randomization

        N, dev = self.num_envs, self.device
        self.action_dim = self.spec.action_dim
        self.action = torch.zeros(N, self.action_dim, device=dev)  # last action (policy space)
        self.prev_action = torch.zeros(N, self.action_dim, device=dev)
        self.ctrl = torch.zeros(N, self.model.nu, device=dev, dtype=torch.float64)
        self.episode_step = torch.zeros(N, dtype=torch.long, device=dev)
        self.episode_return = torch.zeros(N, device=dev)
        self.latency = torch.zeros(N, dtype=torch.long, device=dev)  # physics steps
        self.next_push = torch.zeros(N, dtype=torch.long, device=dev)
        self.last_pushes: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's: env ids [k], kicks [k, 2] m/s
        self._substep = torch.arange(self.decimation, device=dev)  # [dec] physics step within a control step
        self._prev_row = 2 * torch.arange(N, device=dev)[:, None]  # [N, 1] env i's previous ctrl: row 2i (_hold)
        self._hold_rows: torch.Tensor | None = None  # [N * dec], from the latencies (_hold)
        self.diverged_total = 0

        base_body = None
        if self.spec.base_body:
            import mujoco
            base_body = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, self.spec.base_body)
        self.randomizer = ModelRandomizer(self.rand_cfg, self.model, self.index.joint_act,
                                          self.index.joint_dof, base_body)
        # per-env randomised physics in a nutshell (critic terms): rows of one [3, N] tensor, so a reset
        # writes its envs with one indexed copy, and each term is contiguous (torch.cat's fast path)
        self._dr_summary = torch.ones(3, N, device=dev)
        self.dr_summary = {k: self._dr_summary[j] for j, k in enumerate(("friction", "mass_scale", "strength"))}

        self.task.bind(self)
        self._default_ctrl = self.task.default_ctrl().to(self.device, torch.float64)  # [N, nu]
        self.policy_obs = ObservationBuilder(self.spec.observation, N, dev, xp="torch",
                                             default_q=self.spec.array("default"))
        self.obs_dim = self.policy_obs.dim
        self.critic_dims = self.task.critic_term_dims()
        self.critic_obs_dim = self.spec.observation.frame_dim + sum(self.critic_dims.values())
        self.reward_weights = dict(self.task.cfg.reward_weights)
        self._reward_names = [k for k, w in self.reward_weights.items() if w != 0.0]
        self._reward_w = torch.tensor([self.reward_weights[k] for k in self._reward_names], device=self.device)
        self._obs: dict[str, torch.Tensor] | None = None
        self._noise_amp = self._noise_vector()

    # ---- construction -----------------------------------------------------------------
    def _make_backend(self):
        if self.cfg.backend == "mujoco":
            from s2r.sim.backends.mujoco_cpu import MujocoBackend

            if self.device.type != "cpu":
                raise EnvError("the 'mujoco' backend runs on the CPU; use device='cpu' or backend='warp'")
            return MujocoBackend(self.model, self.num_envs, nthread=self.cfg.nthread,
                                 max_qvel=self.cfg.max_qvel)
        from s2r.sim.backends.warp_gpu import WarpBackend  # noqa: deferred: needs mujoco-warp

        return WarpBackend(self.model, self.num_envs, device=self.device, max_qvel=self.cfg.max_qvel)

    def _noise_vector(self) -> torch.Tensor | None:
        """Per-dimension noise amplitude of the (scaled) policy frame, or None."""
        amp = self.rand_cfg.obs_noise if self.rand_cfg.enabled else {}
        if not amp:
            return None
        try:
            vec = self.spec.observation.noise_amplitudes(amp)
        except ValueError as e:
            raise EnvError(str(e)) from None
        return torch.tensor(vec, dtype=torch.float32).to(self.device)

    # ---- public API -------------------------------------------------------------------
    @property
    def observation_space_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"policy": (self.obs_dim,), "critic": (self.critic_obs_dim,)}

    def reset(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Reset every env. Returns {"policy": [N, obs_dim], "critic": [N, critic_obs_dim]}."""
        if seed is not None:
            self.gen.manual_seed(seed)
        ids = torch.arange(self.num_envs, device=self.device)
        self._reset_envs(ids)
        self.policy_obs.reset()
        self.task.refresh()
        self._obs = self._observe()
        return self._obs

    def step(self, action: torch.Tensor):
        """action: [N, action_dim] in [-1, 1].

        Returns obs, reward [N], terminated [N] bool, truncated [N] bool, info with
        final_obs (valid where terminated | truncated), episode stats, reward terms.
        """
        if self._obs is None:
            raise EnvError("call reset() before step()")
        action = self._check_action(action)
        N = self.num_envs
        # 2-3: actions -> controls with per-env latency (zero-order hold over decimation)
        self.prev_action = self.action
        self.action = action
        prev_ctrl = self.ctrl
        self.ctrl = self.task.process_action(action).to(torch.float64)
        ctrl_seq = self._hold(prev_ctrl, self.ctrl)  # [N, dec, nu]
        # 4: physics
        diverged = self.backend.step(ctrl_seq).to(self.device)
        self.episode_step += 1
        # 5-6
        self.task.update()
        self._push()
        # 7
        terminated = self.task.terminated() | diverged
        truncated = (self.episode_step >= self.max_episode_steps) & ~terminated
        # 8
        terms = self.task.reward_terms()
        missing = [k for k in self._reward_names if k not in terms]
        if missing:
            raise EnvError(f"task '{self.cfg.task}' reward_weights name unknown term(s) {missing} "
                           f"(the task computes {sorted(terms)})")
        weighted = torch.stack([_float32(terms[k]) for k in self._reward_names], dim=1) * self._reward_w  # [N, T]
        reward = weighted.sum(dim=1)
        log = {"reward_terms": dict(zip(self._reward_names, weighted.mean(dim=0).unbind()))}  # tensors; float() lazily
        any_diverged = bool(diverged.any())
        if any_diverged:
            reward = torch.where(diverged, torch.zeros_like(reward), reward)
            self.diverged_total += int(diverged.sum())
        reward = torch.nan_to_num(reward, nan=0.0, posinf=0.0, neginf=0.0)
        self.episode_return += reward
        done = terminated | truncated
        info: dict[str, Any] = {"log": log, "diverged": diverged, "diverged_total": self.diverged_total}
        succ = self.task.success()
        if succ is not None:
            info["success"] = succ
        # 9-10
        if done.any():
            final = self._observe(commit=False)
            if any_diverged:  # never hand out a NaN observation: reuse the last good one
                for key in final:
                    final[key] = torch.where(diverged[:, None], self._obs[key], final[key])
            info["final_obs"] = final
            ids = done.nonzero(as_tuple=False).squeeze(-1)
            info["episode"] = {"return": self.episode_return.index_select(0, ids),  # copies
                               "length": self.episode_step.index_select(0, ids), "env_ids": ids}
            self._reset_envs(ids)
            self.policy_obs.reset(ids)
            self.task.refresh()
        # 11
        self._obs = self._observe()
        return self._obs, reward, terminated, truncated, info

    def reset_envs(self, ids: torch.Tensor) -> None:
        """Start new episodes in the envs `ids` only (new randomised physics, latency and push schedule, the
        task's reset state); the others go on. For callers that end episodes themselves (world_models'
        simulator prior ends them with its imagined rollouts)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        if len(ids) == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= self.num_envs:
            raise EnvError(f"reset_envs: env ids must lie in [0, {self.num_envs}), got {ids.tolist()[:10]}")
        self._reset_envs(ids)
        self.policy_obs.reset(ids)
        self.task.refresh()
        self._obs = self._observe()

    def centre_randomization(self, scales: dict[str, float]) -> None:
        """Centre the domain randomisation's model scales on `scales` (RandomizationConfig fields, e.g. an
        identified {"motor_strength": 0.6, "mass_scale": 0.9}): each range becomes the task's range times its
        scale ({} restores the task's). Envs draw from the new ranges at their next reset."""
        from s2r.sim.randomization import SCALE_FIELDS

        bad = {k: v for k, v in scales.items() if k not in SCALE_FIELDS or not (math.isfinite(v) and v > 0)}
        if bad:
            raise EnvError(f"centre_randomization: {bad} are not model scales > 0 (fields: {list(SCALE_FIELDS)})")
        base = self.task.cfg.randomization  # the task's ranges (rand_cfg may be a caller's variant of them)
        self.randomizer.cfg = replace(base, **{k: (getattr(base, k)[0] * v, getattr(base, k)[1] * v)
                                               for k, v in scales.items()})

    def default_ctrl(self) -> torch.Tensor:
        """[N, nu] actuator controls that hold the default pose (what a reset applies)."""
        return self._default_ctrl.clone()

    def close(self) -> None:
        self.backend.close()

    # ---- internals ---------------------------------------------------------------------
    def _check_action(self, action) -> torch.Tensor:
        if not isinstance(action, torch.Tensor):
            action = torch.as_tensor(np.asarray(action), dtype=torch.float32)
        if action.shape != (self.num_envs, self.action_dim):
            raise EnvError(f"action has shape {tuple(action.shape)}, expected "
                           f"[num_envs={self.num_envs}, action_dim={self.action_dim}] for task "
                           f"'{self.cfg.task}'")
        # a copy: the env keeps it as the last action and zeroes rows of envs that reset; the caller's
        # tensor (which a trainer stores in its replay buffer after the step) must stay as it was
        action = action.to(self.device, torch.float32, copy=True)
        if not _all_finite(action):
            env_ids = (~torch.isfinite(action)).any(1).nonzero().squeeze(-1).tolist()
            raise EnvError(f"action contains NaN/Inf in env(s) {env_ids[:10]}"
                           f"{' ...' if len(env_ids) > 10 else ''}")
        return action

    def _reset_envs(self, ids: torch.Tensor) -> None:
        k = len(ids)
        if self.randomizer.active:
            params, summary = self.randomizer.sample(k, self.gen)
            self.backend.set_params(ids, params)
            vals = np.stack([summary[key] for key in self.dr_summary])  # [3, k]
            self._dr_summary.index_copy_(1, ids, torch.as_tensor(vals, dtype=torch.float32, device=self.device))
        rc = self.rand_cfg
        if rc.enabled:
            lo, hi = rc.latency_steps
            hi = min(hi, self.decimation)
            self.latency.index_copy_(0, ids, torch.randint(lo, hi + 1, (k,), generator=self.gen).to(self.device))
        else:
            self.latency[ids] = 0
        self._hold_rows = None
        # before task.reset: the task sets up a new episode (step 0), not one that goes on from the last
        for state in (self.episode_step, self.episode_return, self.action, self.prev_action):
            state.index_fill_(0, ids, 0)
        qpos, qvel = self.task.reset(ids)
        self.backend.reset_envs(ids, qpos, qvel)
        self.ctrl.index_copy_(0, ids, self._default_ctrl.index_select(0, ids))  # ctrl[ids] = default
        self.next_push.index_copy_(0, ids, self._push_interval(k))  # from episode step 0
        self.task.after_reset(ids)

    def _hold(self, prev: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Controls per physics step [N, dec, nu]: prev [N, nu] for an env's first `latency` physics steps,
        then new (per-env latency, zero-order hold). Rows of [prev; new] picked by index: half the CPU time of
        a broadcast torch.where; the rows change only with the latencies (resets)."""
        N, dec = self.num_envs, self.decimation
        if self._hold_rows is None:
            self._hold_rows = (self._prev_row + (self._substep >= self.latency[:, None])).reshape(-1)
        both = torch.stack([prev, new], dim=1).view(2 * N, -1)  # [2N, nu]: env i's prev, new at rows 2i, 2i + 1
        return both.index_select(0, self._hold_rows).view(N, dec, -1)

    def _push_interval(self, k: int) -> torch.Tensor:
        """[k] control steps to the next push, drawn from push_interval_s, at least 1. The arithmetic in numpy
        float32 on the CPU draw: torch's float32 ops on these k numbers (each scalar rounded to float32, one
        rounding per op, truncation toward zero), without a dispatch per op."""
        lo, hi = self.rand_cfg.push_interval_s
        u = torch.rand(k, generator=self.gen).numpy()  # [k] float32
        steps = (np.float32(lo) + np.float32(hi - lo) * u) / np.float32(self.control_dt)
        return torch.from_numpy(np.maximum(steps.astype(np.int64), 1)).to(self.device)

    def _push(self) -> None:
        self.last_pushes = None
        rc = self.rand_cfg
        if not rc.enabled or rc.push_velocity <= 0 or self.index.base_dof is None:
            return
        due = self.episode_step >= self.next_push
        if not due.any():
            return
        ids = due.nonzero().squeeze(-1)
        sim_ids = ids.to(self.backend.qvel.device)  # backend state may live elsewhere (warp: its device)
        qvel = self.backend.qvel[sim_ids].clone()  # [k, nv]
        kick = (torch.rand(len(ids), 2, generator=self.gen, dtype=torch.float64) * 2 - 1) * rc.push_velocity
        qvel[:, self.index.base_dof:self.index.base_dof + 2] += kick.to(qvel.device, qvel.dtype)
        self.backend.set_qvel(sim_ids, qvel)
        self.last_pushes = (ids, kick)
        self.next_push.index_copy_(0, ids, self.episode_step.index_select(0, ids) + self._push_interval(len(ids)))

    def _observe(self, commit: bool = True) -> dict[str, torch.Tensor]:
        # the spec's terms from the task's RobotState, by control/terms.py: the code the robot runs
        clean = self.policy_obs.frame(self.policy_obs.terms(self.task.robot_state()))  # [N, frame_dim]
        noisy = clean
        if self._noise_amp is not None:  # uniform noise on the raw terms (= scale x noise after scaling)
            # uniform_(-1, 1) gives 2u - 1 of rand's u: the same numbers and random stream, two ops fewer
            u = torch.empty(clean.shape).uniform_(-1, 1, generator=self.gen).to(self.device)
            noisy = u.mul_(self._noise_amp).add_(clean)  # clean + amp (2u - 1), in place
        # commit=False: a final observation, from the same history without advancing it. noisy is new
        # (noise on, or the frame itself) and the env never updates it in place: the builder keeps it
        policy = self.policy_obs.push(noisy, owned=True) if commit else self.policy_obs.peek(noisy, owned=True)
        parts = [clean]
        priv = self.task.critic_terms()
        for name, dim in self.critic_dims.items():
            t = priv[name]
            if t.shape != (self.num_envs, dim) or t.dtype is not clean.dtype:  # e.g. [N], or bool contacts
                t = t.to(clean.dtype).reshape(self.num_envs, dim)
            parts.append(t)
        critic = torch.cat(parts, dim=-1)
        return {"policy": policy, "critic": critic}

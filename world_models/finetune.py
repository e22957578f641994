"""Safe finetuning with a world model (LIFT's recipe, ../shared/ALGORITHMS.md, "Diffusion world models for
safe finetuning"): the target system only ever runs the deterministic (mean) policy; SAC/DSAC-T explore
only inside the imagined env, in short rollouts started from real target states.

Data in: a pretrained run (`s2r train`: actor, critics, temperature, the frozen observation normalisers),
a world model (`s2r wm train` on sim rollouts: its state is the task's critic observation, so the run's
critics read imagined states as they read simulated ones) and a target system behind BatchedEnvProtocol:
in simulation an s2r task, possibly shifted (env overrides: friction, mass, motor strength, latency),
standing in for the real robot. Out: a run directory (config.yaml + checkpoints/, the trainer's format:
`s2r export` and `s2r eval` read it), report.json and rounds.csv.

One round (`rounds` of them):
    1. collect    K vectorised steps on the target, action = tanh(mu(s)) (the mean; never a sample)
                  -> real buffer, and the target data the model learns from and imagination starts from
    2. model      `model_updates` EDM steps on all target data so far (train_diffusion with
                  fit_normalizers=False: the model keeps learning, its normalisers stay the pretraining
                  data's; only the clamp range is widened to the states the target showed)
    3. imagine    horizon H_r ramped horizon_start -> horizon_end over the rounds; ImaginedEnv from real
                  target windows (safe-set gates, u gate, r - lambda u); the stochastic policy acts; after
                  each imagined step `utd` SAC/DSAC-T updates on batches of real_ratio real target
                  transitions and 1 - real_ratio imagined ones (LIFT: 0.06)
    4. evaluate   the deterministic policy on a separate target instance (a measurement; its steps and
                  falls are reported apart from the collection's)

Safety on the target. The target sees only the deterministic action, through the same action path as
deployment (task.process_action: scale, default pose, clip, PD in the sim; ActionProcessor in the node).
On the robot the deployed node's safety filter (control/safety.py: joint, rate and attitude guards,
watchdog, e-stop ramp) sits between this policy and the motors; the simulated target here has no such
filter, so falls counted on it are the policy's own.

Shapes: N target envs, M imagined envs, B batch, S state (critic observation), O policy obs, A actions.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from s2r.control.spec import RobotSpec, check_spec_hash
from s2r.io import atomic_write_text
from s2r.policies.checkpoint import (SPEC_HASH_KEY, SPEC_KEY, SPEC_SOURCE_KEY, CheckpointError, embedded_spec,
                                     prune_checkpoints, rng_state, save_checkpoint)
from s2r.policies.env_protocol import BatchedEnvProtocol
from s2r.policies.evaluate import evaluate_policy, load_run
from s2r.policies.normalizer import RunningNorm
from s2r.policies.replay import ReplayBuffer
from s2r.policies.trainer import config_to_dict
from s2r.sim.overrides import merge_overrides
from s2r.world_models.data import Transitions, cat_transitions, state_layout
from s2r.world_models.diffusion import WorldModelError, load_world_model
from s2r.world_models.imagined_env import ImaginedEnv, ImaginedEnvConfig
from s2r.world_models.train import FitConfig, train_diffusion

TargetFactory = Callable[[int, int], BatchedEnvProtocol]  # (num_envs, seed) -> the target system


@dataclass
class WMFinetuneConfig:
    """LIFT's finetuning settings (ALGORITHMS.md) scaled to a CPU; defaults are LIFT's where it gives one."""

    rounds: int = 10  # collect -> model -> imagine -> update cycles
    real_steps: int = 50  # K: vectorised target steps per round (x target_envs transitions)
    target_envs: int = 4  # parallel target instances (1 on a real robot)
    imagined_envs: int = 256  # parallel imagined rollouts
    imagined_steps: int = 50  # vectorised imagined steps per round
    utd: float = 1.0  # SAC/DSAC-T updates per imagined step
    real_ratio: float = 0.06  # share of real target transitions in each batch (LIFT: 0.06)
    batch_size: int = 256  # LIFT: 256
    tau: float = 0.001  # Polyak factor of the critic targets during finetuning (LIFT: 0.001)
    critic_warmup: int = 0  # critic-only updates before the actor moves (the critics meet new data first)
    nominal_sim_terms: bool = True  # the critics read the task's sim-only terms at their pretraining mean
    lr_actor: float | None = None  # the actor's learning rate while finetuning (None: the run's)
    anchor_weight: float = 1.0  # pull tanh(mu) toward the pretrained policy's on every batch row (0: off)
    target_obs_noise: bool = True  # imagined policy observations carry the target sim's sensor noise (its
    #   randomisation's obs_noise; a robot target has none to read: set imagined.obs_noise)
    identify: bool = False  # estimate the robot's physics from target data (world_models/identify.py): the sim-only
    #   terms for a plain model, the simulator's scales for a sim-prior model
    sim_randomize: bool = True  # a sim-prior model's imagined rollouts each step one robot of the task's domain
    #   randomisation around the (identified) physics, pushes included (sim_prior.py); False: one fixed robot
    horizon_start: int = 1  # imagined horizon of the first round ...
    horizon_end: int = 20  # ... ramped linearly to this in the last (LIFT: 1 -> 20)
    model_updates: int = 200  # EDM gradient steps on the target data per round (0: the model stays fixed)
    model_batch_size: int = 256
    model_lr: float = 3e-4
    imagined: ImaginedEnvConfig = field(default_factory=ImaginedEnvConfig)  # gates, lambda, u_max, samples
    eval_envs: int = 8  # deterministic evaluation episodes on the target per round (0: none)
    real_capacity: int = 200_000
    imagined_capacity: int = 500_000
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the first setting that cannot work."""
        for name in ("rounds", "real_steps", "target_envs", "imagined_envs", "imagined_steps", "batch_size",
                     "horizon_start", "horizon_end", "model_batch_size", "real_capacity", "imagined_capacity"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"world-model finetuning setting {name} must be a whole number >= 1, got {v!r}")
        for name in ("model_updates", "eval_envs", "critic_warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"world-model finetuning setting {name} must be a whole number >= 0, got {v!r}")
        if not 0.0 <= self.real_ratio <= 1.0:
            raise ValueError(f"real_ratio must be in [0, 1], got {self.real_ratio}")
        if not (math.isfinite(self.utd) and self.utd >= 0):
            raise ValueError(f"utd (updates per imagined step) must be a finite number >= 0, got {self.utd}")
        if self.lr_actor is not None and not (math.isfinite(self.lr_actor) and self.lr_actor >= 0):
            raise ValueError(f"lr_actor must be a finite number >= 0, got {self.lr_actor}")
        if not (math.isfinite(self.anchor_weight) and self.anchor_weight >= 0):
            raise ValueError(f"anchor_weight must be a finite number >= 0, got {self.anchor_weight}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.real_capacity < self.rounds * self.real_steps * self.target_envs:
            raise ValueError(f"real_capacity {self.real_capacity} is smaller than the {self.rounds} x "
                             f"{self.real_steps} x {self.target_envs} target transitions the run collects")

    def horizon(self, r: int) -> int:
        """Imagined horizon of round r (0-based): linear ramp horizon_start -> horizon_end."""
        frac = r / (self.rounds - 1) if self.rounds > 1 else 1.0
        return int(round(self.horizon_start + (self.horizon_end - self.horizon_start) * frac))


class WorldModelFinetuner:
    """A pretrained agent, a world model and a target system; see the module docstring."""

    def __init__(self, run: str | Path, world_model: str | Path, cfg: WMFinetuneConfig | None = None,
                 make_target: TargetFactory | None = None, env_overrides: dict[str, Any] | None = None,
                 task: str | None = None):
        self.cfg = cfg = cfg if cfg is not None else WMFinetuneConfig()
        cfg.check()
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed + 7)
        # ---- the pretrained run: actor, critics, temperature; normalisers frozen (they are in the export)
        self.base, self.agent, self.obs_norm, ck, self.ckpt_path = load_run(run)
        self.run_path = Path(run)
        if self.base.reward_norm:
            raise ValueError(f"run {run} was trained with reward_norm: its critics are in units of its return std, "
                             f"which this finetuner does not apply; use the trainer learner (s2r wm finetune "
                             f"--learner trainer), whose trainer carries the scale over")
        self.agent.train()
        self.agent.load_optim_state_dict(ck["optim"])  # the Adam moments it trained with
        if cfg.lr_actor is not None:
            self.agent.set_actor_lr(cfg.lr_actor)
        self.agent.cfg.tau = cfg.tau
        # the anchor: a frozen copy of the pretrained actor; its mean action is each row's BC target
        # (policies/losses.q_filtered_bc_loss with the filter open), weighted by anchor_weight * mean |Q|
        self.anchor = copy.deepcopy(self.agent.actor).requires_grad_(False) if cfg.anchor_weight > 0 else None
        if self.anchor is not None:
            self.agent.cfg.bc_weight = cfg.anchor_weight
        self.critic_norm = RunningNorm(int(ck["critic_obs_dim"]))
        self.critic_norm.load_state_dict(ck["critic_norm"])
        self.critic_norm.freeze()
        self.normalize = self.base.normalize_obs
        self.spec: RobotSpec | None = embedded_spec(ck, self.ckpt_path) if ck.get(SPEC_KEY) is not None else None
        if self.spec is None:
            raise CheckpointError(f"run {run} was trained on a task without a robot spec (a gymnasium id): world-"
                                  f"model finetuning needs the robot contract to check the model and the target")
        self.spec_hash = ck.get(SPEC_HASH_KEY) or ""
        self.dims = {k: int(ck[k]) for k in ("obs_dim", "critic_obs_dim", "action_dim")}
        self.source = f"{self.ckpt_path.parent.parent.name}@{int(ck['env_steps'])}"
        # ---- the world model: same robot spec, the run's critic observation as its state
        wm_path = Path(world_model)
        if wm_path.is_dir():
            from s2r.policies.checkpoint import latest_checkpoint

            found = latest_checkpoint(wm_path)
            if found is None:
                raise FileNotFoundError(f"{wm_path} holds no valid world-model checkpoint (checkpoints/ckpt_*.pt)")
            wm_path = found
        self.wm_path = wm_path
        self.model, model_spec, payload = load_world_model(wm_path)
        if model_spec is None:
            raise WorldModelError(f"world model {wm_path} carries no robot spec; it cannot be checked against "
                                  f"the policy's")
        check_spec_hash(model_spec.hash(), self.spec, f"world model {wm_path}", expected_spec=model_spec.to_dict())
        obs_key = payload.get("obs_key", "critic")
        if obs_key != "critic" or self.model.cfg.state_dim != self.dims["critic_obs_dim"]:
            raise WorldModelError(
                f"world model {wm_path} steps a state of width {self.model.cfg.state_dim} ({obs_key} observation), "
                f"the run's critics read {self.dims['critic_obs_dim']}: finetuning needs a model of the task's "
                f"critic observation (s2r wm train --task ...; a model trained on recordings holds the policy "
                f"observation only)")
        if self.model.cfg.action_dim != self.dims["action_dim"]:
            raise WorldModelError(f"world model {wm_path} takes {self.model.cfg.action_dim} actions, the policy "
                                  f"gives {self.dims['action_dim']}")
        self.layout = json.loads(payload["layout"]) if payload.get("layout") else None
        # a sim-prior model corrects the nominal simulator: rebuild it (one for the data, one per imagined env)
        self._payload = payload
        self.physics: dict[str, float] = {}  # the sim prior's model scales: identified from target data (identify)
        self.sim = self.make_sim(256) if getattr(self.model.cfg, "sim_prior", False) else None
        # ---- the target system: the run's task (optionally shifted) unless a factory is given
        self.task = task or self.base.task
        self.env_overrides = merge_overrides(self.base.env_overrides, env_overrides or {})
        if make_target is None:
            from s2r.sim.gym import make_env

            kw = dict(backend=self.base.backend, spec=self.base.spec, **self.env_overrides)
            make_target = lambda n, seed: make_env(self.task, n, seed=seed, **kw)  # noqa: E731
        self.make_target = make_target  # (num_envs, seed) -> target env; also world_models/dyna.py's evaluation
        self.target = make_target(cfg.target_envs, cfg.seed)
        self.eval_env = make_target(cfg.eval_envs, 10_000 + cfg.seed) if cfg.eval_envs else None
        for env, what in ((self.target, "target system"), (self.eval_env, "evaluation target")):
            if env is None:
                continue
            check_spec_hash(self.spec_hash, env.spec, f"checkpoint {self.ckpt_path} (driving the {what})",
                            expected_spec=self.spec.to_dict())
            have = {"obs_dim": env.obs_dim, "critic_obs_dim": env.critic_obs_dim, "action_dim": env.action_dim}
            if have != self.dims:
                raise CheckpointError(f"checkpoint {self.ckpt_path} expects {self.dims}, the {what} has {have}")
        self.nominal = NominalSimTerms.for_target(self.target, self.spec, self.critic_norm) \
            if cfg.nominal_sim_terms else None
        # the sensor noise the policy meets on the target, for its observations in imagination
        rc = getattr(self.target, "rand_cfg", None)
        self.obs_noise = (dict(cfg.imagined.obs_noise) if cfg.imagined.obs_noise else
                          dict(rc.obs_noise) if cfg.target_obs_noise and rc is not None and rc.enabled else {})
        if cfg.identify and self.nominal is None:
            raise ValueError("identify needs sim-only critic terms held at a value (nominal_sim_terms on, a task "
                             "that declares sim_only_critic_terms)")
        # the model's values of the sim-only terms: the pretraining mean until identified from target data
        self.terms = self.nominal.value.clone() if cfg.identify else None
        # ---- memory
        A, O, S = self.dims["action_dim"], self.dims["obs_dim"], self.dims["critic_obs_dim"]
        self.real = ReplayBuffer(cfg.real_capacity, cfg.target_envs, O, S, A, "cpu", gamma=self.agent.cfg.gamma)
        self.imagined = ReplayBuffer(cfg.imagined_capacity, cfg.imagined_envs, O, S, A, "cpu",
                                     gamma=self.agent.cfg.gamma)
        self.target_data: Transitions | None = None
        self._obs = self.target.reset(seed=cfg.seed)
        self._episode = torch.arange(cfg.target_envs)  # [N] episode id of each target env
        self._next_episode = cfg.target_envs
        self.counts = {"target_steps": 0, "target_episodes": 0, "target_falls": 0, "eval_steps": 0,
                       "eval_falls": 0, "imagined_steps": 0, "imagined_rollouts": 0, "halted_nan": 0,
                       "halted_uncertain": 0, "unsafe": 0, "joint_limit": 0, "model_terminated": 0, "clamped": 0,
                       "updates": 0, "real_samples": 0, "imagined_samples": 0, "model_updates": 0}
        self.rounds: list[dict] = []
        self._update_debt = 0.0

    # ---- acting ------------------------------------------------------------------------------
    def _pol(self, obs: Tensor) -> Tensor:
        return self.obs_norm.normalize(obs) if self.normalize else obs

    def _crit(self, obs: Tensor) -> Tensor:
        return self.critic_norm.normalize(obs) if self.normalize else obs

    @torch.no_grad()
    def deterministic_action(self, obs: Tensor) -> Tensor:
        """policy obs [N, O] raw -> tanh(mu) [N, A]: the only action the target ever receives."""
        return self.agent.act(self._pol(obs), deterministic=True)

    # ---- 1. collect ---------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, act: Callable[[Tensor], Tensor] | None = None) -> Transitions:
        """K vectorised steps of the deterministic policy on the target -> real buffer; the new
        transitions (env-major rows: one episode's rows consecutive) for the model. act: raw policy obs
        -> action, another deterministic policy (world_models/dyna.py: the trainer's current one)."""
        cfg, env = self.cfg, self.target
        act = act or self.deterministic_action
        cols: dict[str, list[Tensor]] = {k: [] for k in ("state", "action", "reward", "next_state", "terminated",
                                                         "episode")}
        for _ in range(cfg.real_steps):
            obs = self._obs
            a = act(obs["policy"])
            nxt, r, term, trunc, info = env.step(a)
            done = term | trunc
            real_next = ({k: torch.where(done[:, None], info["final_obs"][k], nxt[k]) for k in nxt} if done.any()
                         else nxt)
            s, s_next = obs["critic"], real_next["critic"]  # [N, S]
            if self.nominal is not None:
                s, s_next = self.nominal(s), self.nominal(s_next)
            self.real.add(obs["policy"], s, a, r * self.base.reward_scale, real_next["policy"], s_next, term, trunc)
            for k, v in (("state", s), ("action", a), ("reward", r), ("next_state", s_next),
                         ("terminated", term), ("episode", self._episode.clone())):
                cols[k].append(v.cpu())
            self.counts["target_steps"] += env.num_envs
            self.counts["target_episodes"] += int(done.sum())
            self.counts["target_falls"] += int(term.sum())
            if done.any():
                n_new = int(done.sum())
                self._episode[done] = torch.arange(self._next_episode, self._next_episode + n_new)
                self._next_episode += n_new
            self._obs = nxt
        n = env.num_envs
        flat = {k: torch.stack(v, 1).reshape(n * cfg.real_steps, *v[0].shape[1:]) for k, v in cols.items()}
        new = Transitions(flat["state"].float(), flat["action"].float(), flat["reward"].float(),
                          flat["next_state"].float(), flat["terminated"].bool(), flat["episode"].long(), self.spec,
                          "critic", self.layout)
        self.target_data = new if self.target_data is None else cat_transitions([self.target_data, new])
        return new

    def make_sim(self, num_envs: int, randomize: bool = False):
        """A SimPrior for the sim-prior model (None for a plain one), num_envs MuJoCo envs per chunk, at the
        physics identified so far (randomize: one randomised robot per env, for imagined rollouts)."""
        if not getattr(self.model.cfg, "sim_prior", False):
            return None
        from s2r.world_models.sim_prior import sim_prior_from_payload

        if self.layout is None:
            raise WorldModelError(f"world model {self.wm_path} corrects a simulator but carries no state layout")
        sim = sim_prior_from_payload(self._payload, self.layout, num_envs, randomize=randomize)
        if self.physics:
            sim.set_physics(self.physics)
        return sim

    def model_data(self) -> Transitions:
        """The target data as the model reads it: with `identify`, the sim-only terms hold the estimate (the
        critics' buffers keep the pretraining mean: values outside their training range mislead them)."""
        data = self.target_data
        if self.terms is None:
            return data
        held = dataclasses.replace(self.nominal, value=self.terms)  # the same columns, held at the estimate
        return dataclasses.replace(data, state=held(data.state), next_state=held(data.next_state))

    # ---- 1b. which robot is this? ---------------------------------------------------------------
    def identify(self) -> dict:
        """Which robot is this, from all target data so far. A sim-prior model: the simulator's motor
        strength, mass and friction scales, by its own one-step error (the sim prior then steps the estimate;
        the model's state terms stay at the pretraining mean). A plain model: the sim-only terms of its state,
        by the model's one-step error over its range. -> the round's identification columns."""
        from s2r.world_models.identify import identify_physics, identify_terms

        if self.sim is not None:
            phys = identify_physics(self.sim, self.target_data, start=self.physics or None)
            self.physics = phys.value
            return {**{f"identified_{k}": round(v, 4) for k, v in phys.value.items()},
                    "identify_error": round(phys.error, 4), "identify_error_start": round(phys.error_start, 4),
                    "identify_on_edge": len(phys.on_edge)}
        res = identify_terms(self.model, self.target_data, self.nominal.columns, self.terms, seed=self.cfg.seed)
        self.terms = res.value
        return {**{f"identified_{n}": round(float(v), 4) for n, v in zip(self.nominal.names, res.value)},
                "identify_error": round(res.error, 4), "identify_error_start": round(res.error_start, 4),
                "identify_on_edge": int(res.on_edge.sum())}

    # ---- 2. the model keeps learning ------------------------------------------------------------
    def update_model(self) -> float:
        """EDM steps on all target data so far (normalisers fixed); the clamp range takes in the target's
        states. -> the mean loss of the last steps (nan when no update ran)."""
        m, data = self.model, self.model_data()
        with torch.no_grad():
            both = torch.cat([data.state, data.next_state])
            m.state_lo.copy_(torch.minimum(m.state_lo, both.min(0).values))
            m.state_hi.copy_(torch.maximum(m.state_hi, both.max(0).values))
        if not self.cfg.model_updates:
            return float("nan")
        fit = FitConfig(steps=self.cfg.model_updates, batch_size=self.cfg.model_batch_size, lr=self.cfg.model_lr,
                        seed=self.cfg.seed + len(self.rounds))
        if self.sim is not None:  # a sim-prior model trains on the simulator's next states (imagination needs none)
            data = data.with_prior(self.sim)
        try:
            hist = train_diffusion(m, data, fit, fit_normalizers=False, log_every=max(1, self.cfg.model_updates))
        except ValueError:  # no window with k steps of history yet (a first round of 1 step)
            return float("nan")
        self.counts["model_updates"] += self.cfg.model_updates
        return hist[-1][1]

    # ---- 3. imagine and learn -------------------------------------------------------------------
    def _batch(self) -> dict[str, Tensor]:
        """real_ratio x B real target transitions + the rest imagined, normalised with the frozen norms."""
        B = self.cfg.batch_size
        n_real = min(B, max(1, int(round(self.cfg.real_ratio * B)))) if self.cfg.real_ratio > 0 else 0
        parts = ([self.real.sample(n_real, self.gen)] if n_real else []) + \
                ([self.imagined.sample(B - n_real, self.gen)] if B > n_real else [])
        b = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # [B, ...]
        self.counts["real_samples"] += n_real
        self.counts["imagined_samples"] += B - n_real
        for k in ("obs", "next_obs"):
            b[k] = self._pol(b[k])
        for k in ("critic_obs", "next_critic_obs"):
            b[k] = self._crit(b[k])
        if self.anchor is not None:
            with torch.no_grad():
                b["demo_action"] = self.anchor.deterministic(b["obs"])  # [B, A] the pretrained tanh(mu)
            b["demo"] = torch.ones(B, dtype=torch.bool)
            b["q_demo"] = torch.full((B,), math.inf)
        return b

    def imagine(self, horizon: int) -> dict:
        """`imagined_steps` steps of the stochastic policy in the model from real target windows; `utd`
        agent updates after each. -> the last update's statistics."""
        cfg = self.cfg
        icfg = dataclasses.replace(cfg.imagined, horizon=horizon, obs_noise=self.obs_noise)
        ienv = ImaginedEnv(self.model, self.model_data(), cfg.imagined_envs, icfg, spec=self.spec,
                           seed=cfg.seed + 100 * len(self.rounds),
                           sim=self.make_sim(cfg.imagined_envs, cfg.sim_randomize))
        obs = ienv.reset()
        stats: dict = {}
        for _ in range(cfg.imagined_steps):
            a = self.agent.act(self._pol(obs["policy"]))  # a sample: exploration happens here only
            nxt, r, term, trunc, info = ienv.step(a)
            done = term | trunc
            real_next = ({k: torch.where(done[:, None], info["final_obs"][k], nxt[k]) for k in nxt} if done.any()
                         else nxt)
            c, c_next = obs["critic"], real_next["critic"]  # [M, S]
            if self.terms is not None:  # the critics read the pretraining mean, as in the real buffer
                c, c_next = self.nominal(c), self.nominal(c_next)
            self.imagined.add(obs["policy"], c, a, r * self.base.reward_scale, real_next["policy"], c_next, term, trunc)
            self.counts["imagined_steps"] += ienv.num_envs
            self.counts["imagined_rollouts"] += int(done.sum())
            obs = nxt
            self._update_debt += cfg.utd
            n = int(self._update_debt)
            self._update_debt -= n
            for _ in range(n):
                warm = self.counts["updates"] < cfg.critic_warmup
                stats = agent_update(self.agent, self._batch(), critic_only=warm)
                self.counts["updates"] += 1
                for k, v in stats.items():
                    if isinstance(v, Tensor) and not torch.isfinite(v).all():
                        raise FloatingPointError(f"non-finite {k} at finetuning update {self.counts['updates']}; "
                                                 f"nothing was saved")
        for k in ("halted_nan", "halted_uncertain", "unsafe", "joint_limit", "model_terminated", "clamped"):
            self.counts[k] += ienv.counts[k]
        return stats

    # ---- 4. evaluate -------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """One deterministic episode per eval env on the target (same seed every round)."""
        if self.eval_env is None:
            return {}
        out = evaluate_policy(self.eval_env, self.deterministic_action, seed=10_000 + self.cfg.seed)
        n = self.eval_env.num_envs
        self.counts["eval_steps"] += int(round(out["length_mean"] * n))
        self.counts["eval_falls"] += int(round(out["terminated_rate"] * n))
        return out

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, out: str | Path | None = None, progress: Callable[[dict], None] | None = None) -> dict:
        """All rounds (evaluating the pretrained policy first); saves to `out` when given. -> the report."""
        t0 = time.perf_counter()
        before = self.evaluate()
        for r in range(self.cfg.rounds):
            self.collect()
            ident = self.identify() if self.cfg.identify else {}
            loss = self.update_model()
            H = self.cfg.horizon(r)
            stats = self.imagine(H)
            ev = self.evaluate()
            row = {"round": r + 1, "horizon": H, "model_loss": loss, **ident, **self.counts,
                   **{f"eval_{k}": v for k, v in ev.items()},
                   **{k: float(stats[k]) for k in ("critic_loss", "actor_loss", "alpha", "q_mean") if k in stats},
                   "wall_s": round(time.perf_counter() - t0, 2)}
            self.rounds.append(row)
            if progress is not None:
                progress(row)
        report = {"from": str(self.run_path), "source": self.source, "world_model": str(self.wm_path),
                  "task": self.task, "env_overrides": self.env_overrides, "config": _jsonable(self.cfg),
                  "eval_before": before, "eval_after": self.rounds[-1] if self.rounds else {},
                  **{k: v for k, v in self.counts.items()}, "rounds": self.rounds,
                  "wall_s": round(time.perf_counter() - t0, 2)}
        if out is not None:
            report["checkpoint"] = str(self.save(out, report))
            report["run"] = str(out)
        return report

    # ---- output ------------------------------------------------------------------------------
    def payload(self) -> dict:
        """A checkpoint in the trainer's format (s2r export / s2r eval read it); its config targets the
        finetuning target (task and env overrides), so `s2r eval` measures the policy there."""
        base = dataclasses.replace(self.base, task=self.task, env_overrides=self.env_overrides,
                                   agent=self.agent.cfg)
        spec = self.spec
        return {
            "format": "s2r-train-v1", "task": self.task,
            SPEC_HASH_KEY: self.spec_hash, SPEC_KEY: json.dumps(spec.to_dict()),
            SPEC_SOURCE_KEY: spec.source,
            "algo": base.algo, "policy": base.policy, "config": config_to_dict(base),
            "env_steps": self.counts["target_steps"], "n_updates": self.counts["updates"],
            "agent": self.agent.state_dict(),
            "optim": self.agent.optim_state_dict(),
            "obs_norm": self.obs_norm.state_dict(), "critic_norm": self.critic_norm.state_dict(),
            "rng": rng_state(), "gen": self.gen.get_state(), "eval_history": "[]",
            **self.dims,
            "wm_finetune": json.dumps({"source": self.source, "world_model": str(self.wm_path),
                                       "config": _jsonable(self.cfg), "counts": self.counts}),
        }

    def save(self, run_dir: str | Path, report: dict | None = None) -> Path:
        """run_dir/config.yaml, checkpoints/ckpt_<target steps>.pt (atomic), report.json, rounds.csv."""
        run_dir = Path(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        payload = self.payload()
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(payload["config"], sort_keys=False))
        path = run_dir / "checkpoints" / f"ckpt_{self.counts['target_steps']:09d}.pt"
        save_checkpoint(path, payload)
        prune_checkpoints(run_dir, keep=3)
        if report is not None:
            atomic_write_text(run_dir / "report.json", json.dumps({**report, "checkpoint": str(path)}, indent=2))
        if self.rounds:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(self.rounds[-1]))
            w.writeheader()
            w.writerows(self.rounds)
            atomic_write_text(run_dir / "rounds.csv", buf.getvalue())
        return path

    def close(self) -> None:
        self.target.close()
        if self.eval_env is not None:
            self.eval_env.close()
        if self.sim is not None:
            self.sim.close()


@dataclass
class NominalSimTerms:
    """critic obs [N, S] -> a copy whose sim-only columns (Task.sim_only_critic_terms: randomised physics)
    hold the pretraining mean, as they would on a robot that cannot measure them. Without it a shifted
    target feeds the critics values many stds outside what they were trained on."""

    columns: Tensor  # [k] long
    value: Tensor  # [k] raw units (the critic normaliser's mean)
    names: tuple[str, ...] = ()  # [k] one per column: the term's name (name_j for a term of several dims)

    @classmethod
    def for_target(cls, env: BatchedEnvProtocol, spec: RobotSpec, critic_norm: RunningNorm) -> "NominalSimTerms | None":
        """None for a target without sim-only terms (a task that declares none, a robot, a gymnasium env)."""
        names = getattr(getattr(env, "task", None), "sim_only_critic_terms", ())
        dims = getattr(env, "critic_dims", None)
        if not names or dims is None:
            return None
        lay = state_layout(spec, dims)
        cols = torch.cat([torch.arange(lay[f"critic.{n}"][0], sum(lay[f"critic.{n}"])) for n in names])
        col_names = tuple(n if lay[f"critic.{n}"][1] == 1 else f"{n}_{j}" for n in names
                          for j in range(lay[f"critic.{n}"][1]))
        return cls(cols, critic_norm.mean[cols].float().clone(), col_names)

    def __call__(self, critic_obs: Tensor) -> Tensor:
        out = critic_obs.clone()
        out[:, self.columns] = self.value.to(out.dtype)
        return out


def agent_update(agent, batch: dict[str, Tensor], critic_only: bool = False) -> dict:
    """agent.update(batch); critic_only: the actor, temperature and targets stay (policy_delay pushed out,
    as policies/hil.py's critic warm-up)."""
    if not critic_only:
        return agent.update(batch)
    delay = agent.cfg.policy_delay
    agent.cfg.policy_delay = 1 << 62
    try:
        return agent.update(batch)
    finally:
        agent.cfg.policy_delay = delay


def _jsonable(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def finetune_with_world_model(run: str | Path, world_model: str | Path, out: str | Path,
                              cfg: WMFinetuneConfig | None = None, env_overrides: dict[str, Any] | None = None,
                              task: str | None = None, export: str | Path | None = None,
                              progress: Callable[[dict], None] | None = None) -> dict:
    """`s2r wm finetune` / `s2r finetune --world-model`: run every round, save the run dir (and the
    verified ONNX export); -> the report."""
    out = Path(out)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"--out {out} already holds a run; choose a new folder")
    ft = WorldModelFinetuner(run, world_model, cfg, env_overrides=env_overrides, task=task)
    try:
        report = ft.run(out, progress)
    finally:
        ft.close()
    if export is not None:
        from s2r.policies.export import export_onnx

        rep = export_onnx(report["checkpoint"], export)
        report["export"] = str(export)
        report["export_max_abs_err"] = rep["max_abs_err_random"]
    return report

"""Finetuning with the trainer inside the model (Dyna): the run's own recipe, in imagination.

world_models/finetune.py keeps the policy near the pretrained one (short imagined branches, an anchor)
and so never does harm, but on a shifted G1 it did not improve either. This learner lets the whole
trainer loop (policies/trainer.py: stochastic exploration, replay, n-step SAC/DSAC-T updates, running
normalisers) run in an ImaginedEnv, initialised from the pretrained run, exactly as the run would
continue training on the target if one could explore there:

    1. collect    `target_steps` deterministic steps of the pretrained policy on the target
                  (the only thing the target ever executes, as in finetune.py)
    2. model      `model_updates` EDM steps on that data (the model's normalisers stay fixed)
    3. imagine    Trainer(init_from=run) for `imagined_steps` env steps in an ImaginedEnv whose
                  rollouts start from windows of the target data, with the target's sensor noise on the
                  policy observation and the safe set / uncertainty gates of imagined_env.py
    4. evaluate   deterministic episodes on the target (the trainer's evaluation env)

With `rounds` R > 1 the four steps repeat (MBPO's loop): each round collects target_steps / R steps with the
trainer's *current* deterministic policy, the model learns from all target data so far, and the trainer goes
on (same agent, buffer, step count) for imagined_steps / R steps in rollouts started from all of it. A policy
that has moved into states where the model still holds the pretraining robot's dynamics is shown the target's
there before it trains further. With `identify`, the randomised-physics terms of the model's state are
estimated from the target data each round (world_models/identify.py; needs a model trained with them varying),
so imagination steps the identified robot and the trainer's critics read the estimate; with a sim-prior model
the simulator's own motor strength, mass and friction scales are estimated instead (identify_physics), and
every simulator of the imagined envs steps them.

Each round also reports the model's survival agreement (the imagined fall rate of the policy the target just
ran, beside the target's). With `select="model"` the result is the checkpoint whose deterministic policy scores
best in imagined episodes from the target's episode starts, not the last: choosing costs no target step.

The output is an ordinary training run (checkpoints, eval.csv, TensorBoard) whose config targets the
shifted task, so `s2r eval` and `s2r export` read it (report["checkpoint"] is the result). Measured in
docs/WORLD_MODELS.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from s2r.io import atomic_write_text
from s2r.world_models.diffusion import WorldModelError
from s2r.world_models.finetune import WMFinetuneConfig, WorldModelFinetuner, _jsonable
from s2r.world_models.imagined_env import ImaginedEnv, ImaginedEnvConfig


@dataclass
class DynaConfig:
    """Settings of `s2r wm finetune --learner trainer`; the trainer's own settings are the run's."""

    target_steps: int = 10_000  # deterministic target steps in all (target_envs in parallel, split over rounds)
    target_envs: int = 4
    model_updates: int = 2_000  # EDM steps on the target data (0: the model stays as trained)
    model_batch_size: int = 256
    model_lr: float = 3e-4
    imagined_steps: int = 100_000  # the trainer's env steps inside the model, in all (split over rounds)
    rounds: int = 1  # collect -> model -> imagine cycles; from the second the target runs the trainer's policy
    identify: bool = False  # estimate the randomised physics from the target data each round (a sim-prior model:
    #   the simulator's scales, identify.identify_physics)
    sim_randomize: bool = True  # a sim-prior model: each imagined rollout steps one robot of the task's domain
    #   randomisation around the identified physics, with its pushes (WMFinetuneConfig.sim_randomize)
    # where the trainer explores: "model", the world model (imagined rollouts from the target's states); "sim", the
    # simulator a sim-prior model corrects, as the whole task (its resets, pushes, latency, sensor noise, its
    # randomisation centred on the identified physics) without the learned residual: identification alone
    imagine: str = "model"
    imagined_envs: int | None = None  # None: the run's num_envs
    horizon: int = 250  # imagined steps before truncation (a target episode: 5 s at 50 Hz)
    imagined: ImaginedEnvConfig = field(default_factory=ImaginedEnvConfig)  # gates, lambda, u_max, samples
    target_obs_noise: bool = True  # the target sim's sensor noise on imagined policy observations
    nominal_sim_terms: bool = True  # the critics read the sim-only terms at their pretraining mean
    eval_every: int | None = None  # imagined steps between target evaluations (None: at the end only)
    eval_envs: int = 32  # deterministic evaluation episodes on the target
    # imagined episodes of the policy the target just ran, from the first steps of its target episodes: the model's
    # fall rate for it beside the target's (survival agreement, reported per round; 0: not measured)
    agreement_rollouts: int = 64
    # which checkpoint is the result: "last", or "model": every checkpoint (one per checkpoint_every imagined steps,
    # the pretrained policy's among them) is scored by its mean return in `select_rollouts` imagined episodes from the
    # first steps of the target's episodes, and the best is kept: no target step is spent on choosing
    select: str = "last"
    select_rollouts: int = 128
    checkpoint_every: int | None = None  # imagined steps between checkpoints (None: eval_every, else once a round)
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the first setting that cannot work."""
        for name in ("target_steps", "target_envs", "imagined_steps", "rounds", "horizon", "eval_envs",
                     "model_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"trainer-in-the-model setting {name} must be a whole number >= 1, got {v!r}")
        if isinstance(self.agreement_rollouts, bool) or not isinstance(self.agreement_rollouts, int) \
                or self.agreement_rollouts < 0:
            raise ValueError(f"agreement_rollouts must be a whole number >= 0, got {self.agreement_rollouts!r}")
        if self.imagine not in ("model", "sim"):
            raise ValueError(f"imagine must be 'model' or 'sim', got {self.imagine!r}")
        if self.imagine == "sim" and not self.identify:
            raise ValueError("imagine='sim' trains in the simulator at the identified physics: it needs identify")
        if self.select not in ("last", "model"):
            raise ValueError(f"select must be 'last' or 'model', got {self.select!r}")
        if isinstance(self.select_rollouts, bool) or not isinstance(self.select_rollouts, int) \
                or self.select_rollouts < 1:
            raise ValueError(f"select_rollouts must be a whole number >= 1, got {self.select_rollouts!r}")
        for name in ("imagined_envs", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"trainer-in-the-model setting {name} must be a whole number >= 1 or None, "
                                 f"got {v!r}")
        if isinstance(self.model_updates, bool) or not isinstance(self.model_updates, int) or self.model_updates < 0:
            raise ValueError(f"model_updates must be a whole number >= 0, got {self.model_updates!r}")
        if not (math.isfinite(self.model_lr) and self.model_lr > 0):
            raise ValueError(f"model_lr must be a finite number > 0, got {self.model_lr}")
        if self.target_steps < 2 * self.target_envs * self.rounds:
            raise ValueError(f"target_steps {self.target_steps} gives fewer than 2 steps per target env "
                             f"({self.target_envs}) and round ({self.rounds}): no start window for the model")
        if self.imagined_steps < self.rounds:
            raise ValueError(f"imagined_steps {self.imagined_steps} gives no imagined step in some of the "
                             f"{self.rounds} rounds")


def dyna_finetune(run: str | Path, world_model: str | Path, out: str | Path, cfg: DynaConfig | None = None,
                  env_overrides: dict[str, Any] | None = None, task: str | None = None,
                  progress: Callable[[str], None] | None = None, make_target: Any = None) -> dict:
    """Steps 1-4 of the module docstring, `cfg.rounds` times; the run dir `out` is the trainer's.
    make_target: (num_envs, seed) -> the target system (default: the run's task with env_overrides), for
    collection and evaluation. -> the report (per round in report["rounds"])."""
    from s2r.policies.evaluate import policy_act
    from s2r.policies.trainer import Trainer

    cfg = cfg if cfg is not None else DynaConfig()
    cfg.check()
    out = Path(out)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"--out {out} already holds a run; choose a new folder")
    t0 = time.perf_counter()
    # the finetuner's set-up checks the run, the model and the target against one another (spec, widths)
    per_env = cfg.target_steps // (cfg.target_envs * cfg.rounds)  # target steps per env and round
    ft_cfg = WMFinetuneConfig(rounds=cfg.rounds, real_steps=per_env, target_envs=cfg.target_envs,
                              model_updates=cfg.model_updates, model_batch_size=cfg.model_batch_size,
                              model_lr=cfg.model_lr, imagined=cfg.imagined, target_obs_noise=cfg.target_obs_noise,
                              nominal_sim_terms=cfg.nominal_sim_terms, identify=cfg.identify,
                              sim_randomize=cfg.sim_randomize, eval_envs=0,
                              seed=cfg.seed, real_capacity=max(per_env * cfg.target_envs * cfg.rounds, 1))
    ft = WorldModelFinetuner(run, world_model, ft_cfg, make_target=make_target, env_overrides=env_overrides,
                             task=task)
    if cfg.imagine == "sim" and ft.sim is None:
        ft.close()
        raise WorldModelError(f"imagine='sim' trains in the simulator a sim-prior model corrects; {ft.wm_path} is a "
                              f"plain model (s2r wm train --sim-prior)")
    report: dict = {"from": str(ft.run_path), "source": ft.source, "world_model": str(ft.wm_path),
                    "task": ft.task, "env_overrides": ft.env_overrides, "config": _jsonable(cfg)}
    rows: list[dict] = []
    envs: list = []  # the trainer's env: an ImaginedEnv, or the task's BatchedEnv (imagine="sim")
    trainer: Trainer | None = None
    per_round = cfg.imagined_steps // cfg.rounds
    try:
        for r in range(cfg.rounds):
            # 1. the target runs the newest deterministic policy: the pretrained one, then the trainer's
            act = None if trainer is None else policy_act(
                trainer.agent, trainer.obs_norm if trainer.cfg.normalize_obs else None, trainer.device)
            data = ft.collect(act)
            # 2. (which robot is this?) and the model learns from all target data so far
            ident = ft.identify() if cfg.identify else {}
            loss = ft.update_model()
            starts = ft.model_data()
            if progress:
                progress(f"round {r + 1}/{cfg.rounds} target: {ft.counts['target_steps']} deterministic steps, "
                         f"{ft.counts['target_falls']} falls; model: {cfg.model_updates} updates, loss {loss:.4f}"
                         + "".join(f", {k} {v}" for k, v in ident.items() if k.startswith("identified_")))
            # 3-4. the run's own trainer in the model, evaluated on the target
            icfg = dataclasses.replace(cfg.imagined, horizon=cfg.horizon, obs_noise=ft.obs_noise)
            falls_before = (ft.counts["target_falls"] - (rows[-1]["target_falls"] if rows else 0),
                            ft.counts["target_episodes"] - (rows[-1]["target_episodes"] if rows else 0))
            agree = survival_agreement(ft, act or ft.deterministic_action, data, cfg.agreement_rollouts, icfg,
                                       falls_before, seed=cfg.seed + r) if cfg.agreement_rollouts else {}
            if progress and agree:
                progress(f"round {r + 1}/{cfg.rounds} survival agreement: imagined fall rate "
                         f"{agree['imagined_fall_rate']:.3f}, target {agree['target_fall_rate']}")
            if trainer is None:

                def make_imagined(n: int, seed: int):
                    if cfg.imagine == "sim":  # the pretraining task, its robots drawn around the estimate
                        from s2r.sim.gym import make_env

                        envs.append(make_env(ft.task, n, seed=seed, **ft.base.env_overrides))
                        envs[-1].centre_randomization(ft.physics)
                    else:
                        envs.append(ImaginedEnv(ft.model, starts, n, icfg, spec=ft.spec, seed=seed,
                                                sim=ft.make_sim(n, cfg.sim_randomize)))
                    return envs[-1]

                # the run's own settings, initialised from it, its config pointing at the target
                base = ft.base
                every = cfg.eval_every or per_round
                tcfg = dataclasses.replace(
                    base, task=ft.task, env_overrides=ft.env_overrides, init_from=str(run), total_steps=per_round,
                    num_envs=cfg.imagined_envs or base.num_envs, eval_every=every, eval_episodes=cfg.eval_envs,
                    checkpoint_every=cfg.checkpoint_every or every, seed=cfg.seed, progress=False,
                    keep_checkpoints=10**6 if cfg.select == "model" else base.keep_checkpoints)
                trainer = Trainer(tcfg, out, make_env=make_imagined, make_eval_env=ft.make_target)
            else:
                if cfg.imagine == "sim":  # the simulator's robots follow this round's estimate
                    envs[0].centre_randomization(ft.physics)
                else:
                    envs[0].set_starts(starts)
                    if envs[0].sim is not None:  # ... and so do the imagined ones
                        envs[0].sim.set_physics(ft.physics)
                trainer.cfg.total_steps = per_round * (r + 1) if r + 1 < cfg.rounds else cfg.imagined_steps
            ev = trainer.train(close_env=r + 1 == cfg.rounds)  # the imagined env (and its simulator) goes on
            rows.append({"round": r + 1, "target_steps": ft.counts["target_steps"],
                         "target_falls": ft.counts["target_falls"], "target_episodes": ft.counts["target_episodes"],
                         "new_rows": len(data), "model_loss": loss, **ident, **agree,
                         "imagined_steps": trainer.env_steps,
                         "updates": trainer.n_updates, **{f"eval_{k}": v for k, v in ev.items()},
                         "wall_s": round(time.perf_counter() - t0, 2)})
            if progress:
                progress(f"round {r + 1}/{cfg.rounds} imagined: {trainer.env_steps} steps, {trainer.n_updates} "
                         f"updates | target evaluation: return {ev.get('return_mean', float('nan')):.1f}, "
                         f"falls {ev.get('terminated_rate', float('nan')):.3f}")
        selection = select_in_model(ft, out, cfg, icfg) if cfg.select == "model" else []
    finally:
        ft.close()
    assert trainer is not None
    imagined = getattr(envs[0], "counts", {}) if envs else {}  # the imagined env's gates (none in the simulator)
    history = trainer.eval_history
    eval_steps = sum(int(round(h["length_mean"] * cfg.eval_envs)) for h in history)
    report.update({"target_steps": ft.counts["target_steps"], "target_falls": ft.counts["target_falls"],
                   "target_episodes": ft.counts["target_episodes"], "model_loss": rows[-1]["model_loss"],
                   "imagined_steps": trainer.env_steps, "updates": trainer.n_updates,
                   **{f"imagined_{k}": v for k, v in imagined.items() if k != "steps"},
                   "eval_steps": eval_steps, "eval_history": history, "eval_after": history[-1] if history else {},
                   "rounds": rows, "selection": selection,
                   "checkpoint": max(selection, key=lambda c: c["imagined_return"])["checkpoint"] if selection
                   else str(trainer.last_checkpoint), "run": str(out),
                   "data_rows": len(ft.target_data), "wall_s": round(time.perf_counter() - t0, 2)})
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    return report


def survival_agreement(ft: WorldModelFinetuner, act: Callable, data, rollouts: int, icfg, target: tuple[int, int],
                       seed: int = 0) -> dict:
    """Does the model let the policy the target just ran fall as often as the target did? `rollouts` imagined
    episodes of `act` (deterministic) from the first steps of this round's target episodes, as long as the
    trainer's imagined episodes; target = (falls, finished episodes) of the round's collection.
    -> {"imagined_fall_rate", "target_fall_rate", "agreement_rollouts"}. A model that makes a policy fall far more
    (or less) often than the target does teaches the trainer its own falls (docs/WORLD_MODELS.md)."""
    early = _early_rows(ft.target_data.episode, ft.model.cfg.history + 4)  # episodes may span rounds
    out = imagined_episodes(ft, act, early[early >= len(ft.target_data) - len(data)], rollouts, icfg, seed)
    falls, episodes = target
    return {"imagined_fall_rate": round(out["terminated_rate"], 4),
            "target_fall_rate": round(falls / episodes, 4) if episodes else None,
            "agreement_rollouts": rollouts}


def _early_rows(episode, n: int):
    """Indices of the rows among the first n of their episode (rows of one episode are consecutive)."""
    import torch

    new = torch.ones(len(episode), dtype=torch.bool)
    new[1:] = episode[1:] != episode[:-1]
    start = torch.cummax(torch.where(new, torch.arange(len(episode)), 0), 0).values  # each row's episode start
    return (torch.arange(len(episode)) - start < n).nonzero().squeeze(-1)


def imagined_episodes(ft: WorldModelFinetuner, act: Callable, rows, rollouts: int, icfg, seed: int) -> dict:
    """evaluate_policy in an ImaginedEnv of `rollouts` envs whose starts are the target data's `rows`."""
    from s2r.policies.evaluate import evaluate_policy

    env = ImaginedEnv(ft.model, ft.model_data().select(rows), rollouts, icfg, spec=ft.spec, seed=seed,
                      sim=ft.make_sim(rollouts, ft.cfg.sim_randomize))
    try:
        return evaluate_policy(env, act, seed=seed)
    finally:
        env.close()


def select_in_model(ft: WorldModelFinetuner, out: Path, cfg: DynaConfig, icfg) -> list[dict]:
    """Score every checkpoint of the run in `out` by its deterministic policy's imagined episodes (the same starts
    and random numbers for each: the first steps of all target episodes) -> one row per checkpoint."""
    from s2r.policies.checkpoint import list_checkpoints
    from s2r.policies.evaluate import load_run, policy_act

    rows = _early_rows(ft.target_data.episode, ft.model.cfg.history + 4)
    scores = []
    for _, path in list_checkpoints(out):
        tcfg, agent, norm, ck, _ = load_run(path)
        res = imagined_episodes(ft, policy_act(agent, norm if tcfg.normalize_obs else None, "cpu"), rows,
                                cfg.select_rollouts, icfg, seed=cfg.seed + 12345)
        scores.append({"checkpoint": str(path), "env_steps": int(ck["env_steps"]),
                       "imagined_return": round(res["return_mean"], 3),
                       "imagined_fall_rate": round(res["terminated_rate"], 4)})
    return scores

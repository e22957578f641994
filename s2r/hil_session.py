"""A simulated correction session: policy + scripted operator + learner, faster than real time.

The loop a robot session runs, with the simulator standing in for the robot and
`sim/operator.py` for the person:

    policy action (sampled, as HIL-SERL's actor does) -> operator's gamepad (Joy axes/buttons)
      -> control.operator.Arbiter (the robot's arbitration code) -> executed action -> env.step
      -> learner.add(obs, executed action, task reward, next obs, terminated, intervened)
      -> learner updates (UTD per transition) -> evaluation every `eval_every_min` simulated minutes

Methods (bench/hil.py compares them on the same interaction budget):
  hil              RLPD with the operator's corrections in the demonstration buffer
  no-intervention  the same learner, no operator (plain SAC finetuning with LayerNorm critics)
  hg-dagger        the same operator; the actor is trained by behaviour cloning on the corrections
                   only and acts deterministically (HG-DAgger)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from s2r.control.operator import Arbiter, ArbiterConfig
from s2r.policies.hil import HILConfig, RLPDLearner, bc_update
from s2r.sim.overrides import merge_overrides

METHODS = ("hil", "no-intervention", "hg-dagger")


@dataclass
class SessionConfig:
    method: str = "hil"
    minutes: float = 60.0  # simulated interaction, summed over envs
    num_envs: int = 8
    eval_every_min: float = 5.0
    eval_episodes: int = 16
    seed: int = 0
    demo_episodes: int = 0  # teleoperated demonstration episodes first (HIL-SERL: about 20), counted
    # in the interaction budget; they go to the demonstration buffer (hil, hg-dagger) or the online one
    hil: HILConfig = field(default_factory=HILConfig)
    operator_seed: int = 0
    env_overrides: dict = field(default_factory=dict)  # on top of the run's: a shifted robot (dynamics, latency)


def run_session(start: str | Path, cfg: SessionConfig, progress: Callable[[dict], None] | None = None,
                save_dir: str | Path | None = None) -> dict:
    """Run one session from the trained run `start`; -> {"curve": [...], "learner": RLPDLearner, ...}.

    curve rows: minutes (simulated interaction so far), success (deterministic policy, no operator,
    eval_episodes fresh episodes), return, intervention_rate (share of ticks the operator acted
    since the previous row), episodes, wall_s."""
    from s2r.policies.evaluate import evaluate_policy
    from s2r.sim.gym import make_env
    from s2r.sim.operator import OperatorConfig, ScriptedPickOperator

    if cfg.method not in METHODS:
        raise ValueError(f"unknown session method '{cfg.method}'; choose one of {METHODS}")
    learner = RLPDLearner.from_run(start, cfg.hil)
    task = learner.base.task
    overrides = merge_overrides(learner.base.env_overrides, cfg.env_overrides)
    env = make_env(task, cfg.num_envs, seed=cfg.seed, **overrides)
    eval_env = make_env(task, cfg.eval_episodes, seed=10_000 + cfg.seed, **overrides)
    if env.spec is not None:
        from s2r.control.spec import check_spec_hash

        check_spec_hash(learner.spec_hash, env.spec, f"run {start}")
    N, dt = cfg.num_envs, env.control_dt
    with_operator = cfg.method != "no-intervention"
    op = ScriptedPickOperator(env, OperatorConfig(control_hz=1.0 / dt, seed=cfg.operator_seed)) if with_operator \
        else None
    arbiters = [Arbiter(ArbiterConfig.for_spec(env.spec, twist=None)) for _ in range(N)]
    budget = int(cfg.minutes * 60.0 / dt)  # env steps over all envs
    eval_every = int(cfg.eval_every_min * 60.0 / dt)

    def evaluate(steps: int, window: tuple[int, int], episodes: int, t0: float) -> dict:
        act = lambda o: torch.as_tensor(learner.act(o, deterministic=True))  # noqa: E731
        ev = evaluate_policy(eval_env, act, seed=20_000 + cfg.seed)
        row = {"minutes": steps * dt / 60.0, "success": ev.get("success_rate", float("nan")),
               "return": ev["return_mean"], "intervention_rate": window[0] / max(1, window[1]),
               "episodes": episodes, "updates": learner.n_updates, "wall_s": time.perf_counter() - t0}
        if progress is not None:
            progress(row)
        return row

    t0 = time.perf_counter()
    curve = [evaluate(0, (0, 0), 0, t0)]
    obs = env.reset(seed=cfg.seed)
    steps, next_eval, episodes = 0, eval_every, 0
    win_int, win_steps = 0, 0
    t = 0.0
    executed = np.zeros((N, env.action_dim), np.float32)  # [N, A]
    intervened = np.zeros(N, bool)  # [N]
    if cfg.demo_episodes:  # the operator drives whole episodes first; these ticks count as interaction
        demo_op = op or ScriptedPickOperator(env, OperatorConfig(control_hz=1.0 / dt, seed=cfg.operator_seed))
        done_eps = 0
        while done_eps < cfg.demo_episodes:
            demo_op.step(teleoperate=True)
            for i in range(N):
                arbiters[i].update_joy(*demo_op.joy(i, True), t)
                executed[i] = arbiters[i].step(np.zeros(env.action_dim), t)[0]
            next_obs, reward, term, trunc, info = env.step(torch.as_tensor(executed))
            done = term | trunc  # whole episodes: after success the operator holds the cube at the target
            real_next = torch.where(done[:, None], info["final_obs"]["policy"], next_obs["policy"]) \
                if done.any() else next_obs["policy"]
            args = (obs["policy"], executed.copy(), reward, real_next, term.float())
            if with_operator:
                learner.add_demos(*args)
            else:
                learner.add(*args, np.zeros(N, bool))
            obs, steps, t = next_obs, steps + N, t + dt
            ended = torch.nonzero(done).flatten().tolist()
            if ended:
                done_eps += len(ended)
                demo_op.reset(ended)
        obs = env.reset(seed=cfg.seed + 1)
        for a in arbiters:
            a.end_intervention()
        if op is not None:
            op.reset(list(range(N)))
    while steps < budget:
        o = obs["policy"]
        a_pol = learner.act(o, deterministic=cfg.method == "hg-dagger")  # [N, A]
        if op is not None:
            acting = op.step()
            for i in range(N):
                arbiters[i].update_joy(*op.joy(i, bool(acting[i])), t)
                a, _, intervened[i] = arbiters[i].step(a_pol[i], t)
                executed[i] = a
        else:
            executed[:] = a_pol
        next_obs, reward, term, trunc, info = env.step(torch.as_tensor(executed))
        done = term | trunc
        real_next = next_obs["policy"]
        if done.any():
            real_next = torch.where(done[:, None], info["final_obs"]["policy"], real_next)
        learner.add(o, executed.copy(), reward, real_next, term.float(), intervened.copy())
        if cfg.method == "hg-dagger":
            bc_update(learner, int(learner._debt))
            learner._debt -= int(learner._debt)
        else:
            learner.update()
        win_int += int(intervened.sum())
        win_steps += N
        obs = next_obs
        steps += N
        t += dt
        if done.any():
            ids = torch.nonzero(done).flatten().tolist()
            episodes += len(ids)
            if op is not None:
                op.reset(ids)
        if steps >= next_eval or steps >= budget:
            next_eval += eval_every
            curve.append(evaluate(steps, (win_int, win_steps), episodes, t0))
            win_int, win_steps = 0, 0
            if save_dir is not None:
                learner.save(save_dir)
    env.close()
    eval_env.close()
    return {"method": cfg.method, "curve": curve, "learner": learner,
            "takeovers": op.takeovers if op is not None else 0, "wall_s": time.perf_counter() - t0}

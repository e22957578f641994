"""Evaluate a policy: the one episode loop that training's periodic evaluation and `s2r eval` share.

    evaluate_policy(env, act, seed)   one deterministic episode per env of any BatchedEnvProtocol
    evaluate_run(run)                 `s2r eval`: rebuild the agent from a run directory (load_run),
                                      make the task's env, check the robot spec, evaluate, film

The checkpoint's robot spec is checked against the spec the env loads now (control/spec.py:
check_spec_hash): a policy is never evaluated on a robot contract it was not trained for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from s2r.control.spec import check_spec_hash
from s2r.policies.algorithms import make_agent
from s2r.policies.checkpoint import SPEC_KEY, CheckpointError, embedded_spec, latest_checkpoint, load_checkpoint
from s2r.policies.env_protocol import BatchedEnvProtocol
from s2r.policies.normalizer import RunningNorm
from s2r.policies.trainer import config_from_dict, load_train_config, make_env_for


def policy_act(agent, obs_norm: RunningNorm | None, device: str | torch.device) -> Callable[[Tensor], Tensor]:
    """The deterministic policy as it is evaluated and exported: raw policy obs [N, obs_dim] ->
    actions [N, action_dim], normalised by `obs_norm` (None: the run does not normalise)."""

    def act(obs: Tensor) -> Tensor:
        p = obs.to(device)
        return agent.act(obs_norm.normalize(p) if obs_norm is not None else p, deterministic=True)

    return act


@torch.no_grad()
def evaluate_policy(env: BatchedEnvProtocol, act: Callable[[Tensor], Tensor], seed: int,
                    film: Callable[[], None] | None = None) -> dict:
    """One episode in each of the env's `num_envs` envs: reset(seed), then `act` until every episode
    has ended (or max_episode_steps + 5 steps). film(), if given, is called after each step while
    env 0's episode runs. Rewards are the env's raw rewards.

    -> {"return_mean", "return_std", "length_mean" (env steps), "terminated_rate" (share of episodes
    that ended by termination, e.g. a fall, rather than the time limit)} and, where the env reports
    info["success"], "success_rate" (an episode succeeds if it reports success at any step).
    """
    n = env.num_envs
    obs = env.reset(seed=seed)
    returns = torch.zeros(n)  # [n]
    lengths = torch.zeros(n, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    success = torch.zeros(n, dtype=torch.bool)
    fell = torch.zeros(n, dtype=torch.bool)
    reports_success = False
    for _ in range((env.max_episode_steps or 10_000) + 5):
        obs, reward, terminated, truncated, info = env.step(act(obs["policy"]))
        returns += torch.where(done, 0.0, reward.cpu())
        lengths += (~done).long()
        if "success" in info:
            reports_success = True
            success |= info["success"].cpu() & ~done
        if film is not None and not done[0]:
            film()
        fell |= terminated.cpu() & ~done
        done |= (terminated | truncated).cpu()
        if done.all():
            break
    out = {"return_mean": float(returns.mean()), "return_std": float(returns.std(unbiased=False)),
           "length_mean": float(lengths.float().mean()), "terminated_rate": float(fell.float().mean())}
    if reports_success:
        out["success_rate"] = float(success.float().mean())
    return out


def load_run(run: str | Path, device: str = "cpu"):
    """-> (cfg, agent, obs_norm, checkpoint dict, checkpoint path) for a run dir or checkpoint file."""
    run = Path(run)
    if run.is_file():
        ckpt_path, run_dir = run, run.parent.parent
    else:
        run_dir = run
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
        ckpt_path = latest_checkpoint(run_dir)
        if ckpt_path is None:
            raise CheckpointError(f"no valid checkpoint in {run_dir / 'checkpoints'}")
    ck = load_checkpoint(ckpt_path, map_location=device)
    cfg = (config_from_dict(ck["config"]) if isinstance(ck.get("config"), dict)
           else load_train_config(run_dir / "config.yaml"))
    cfg.device = device
    cfg.agent.compile = False
    agent = make_agent(cfg.agent, int(ck["obs_dim"]), int(ck["critic_obs_dim"]), int(ck["action_dim"]), device)
    agent.load_state_dict(ck["agent"])
    agent.eval()
    obs_norm = RunningNorm(int(ck["obs_dim"]), device)
    obs_norm.load_state_dict(ck["obs_norm"])
    obs_norm.freeze()
    return cfg, agent, obs_norm, ck, ckpt_path


def evaluate_run(run: str | Path, episodes: int = 10, video: str | Path | None = None, seed: int = 123) -> dict:
    """`s2r eval`: the run's deterministic policy, one episode in each of `episodes` parallel envs."""
    cfg, agent, obs_norm, ck, path = load_run(run)
    env: BatchedEnvProtocol = make_env_for(cfg, episodes, seed=seed, eval_mode=True)
    renderer, frames = None, []
    try:
        if env.spec is not None:
            trained = embedded_spec(ck, path) if ck.get(SPEC_KEY) is not None else None
            check_spec_hash(ck.get("spec_hash"), env.spec, f"checkpoint {path}",
                            expected_spec=trained.to_dict() if trained is not None else None)
        if env.obs_dim != int(ck["obs_dim"]) or env.action_dim != int(ck["action_dim"]):
            raise CheckpointError(f"checkpoint {path} expects obs {int(ck['obs_dim'])} / action "
                                  f"{int(ck['action_dim'])}, the env has {env.obs_dim} / {env.action_dim}")
        if video is not None:
            from s2r.sim.env import BatchedEnv

            if not isinstance(env, BatchedEnv):
                raise ValueError("--video works for s2r tasks only (gymnasium envs render themselves)")
            from s2r.sim.render import EnvRenderer

            renderer = EnvRenderer(env)
        act = policy_act(agent, obs_norm if cfg.normalize_obs else None, cfg.device)
        film = (lambda: frames.append(renderer.frame(0))) if renderer is not None else None
        result = evaluate_policy(env, act, seed, film=film)
        out = {"checkpoint": str(path), "env_steps": int(ck["env_steps"]), "episodes": episodes, **result}
        if renderer is not None:
            from s2r.sim.render import write_video

            write_video(str(video), frames, fps=1.0 / env.control_dt)
            out["video"] = str(video)
        return out
    finally:
        if renderer is not None:
            renderer.close()
        env.close()

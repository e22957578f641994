"""Evaluate a trained run: rebuild env + agent from the run directory, act deterministically.

The checkpoint's robot-spec hash is checked against the spec the env loads now:
a policy is never evaluated on a robot contract it was not trained for.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from s2r.policies.algorithms import make_agent
from s2r.policies.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from s2r.policies.normalizer import RunningNorm
from s2r.policies.trainer import config_from_dict, make_env_for


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
    cfg = config_from_dict(ck["config"] if isinstance(ck.get("config"), dict)
                           else yaml.safe_load((run_dir / "config.yaml").read_text()))
    cfg.device = device
    cfg.agent.compile = False
    agent = make_agent(cfg.agent, int(ck["obs_dim"]), int(ck["critic_obs_dim"]), int(ck["action_dim"]), device)
    agent.load_state_dict(ck["agent"])
    agent.eval()
    obs_norm = RunningNorm(int(ck["obs_dim"]), device)
    obs_norm.load_state_dict(ck["obs_norm"])
    obs_norm.freeze()
    return cfg, agent, obs_norm, ck, ckpt_path


@torch.no_grad()
def evaluate_run(run: str | Path, episodes: int = 10, video: str | Path | None = None, seed: int = 123) -> dict:
    cfg, agent, obs_norm, ck, path = load_run(run)
    env = make_env_for(cfg, episodes, seed=seed, eval_mode=True)
    spec = getattr(env, "spec", None)
    if spec is not None and ck.get("spec_hash"):
        from s2r.control.spec import check_spec_hash

        check_spec_hash(ck["spec_hash"], spec.hash(), f"checkpoint {path}")
    if env.obs_dim != int(ck["obs_dim"]) or env.action_dim != int(ck["action_dim"]):
        raise CheckpointError(f"checkpoint {path} expects obs {int(ck['obs_dim'])} / action "
                              f"{int(ck['action_dim'])}, the env has {env.obs_dim} / {env.action_dim}")
    renderer, frames = None, []
    if video is not None:
        if not hasattr(env, "task"):
            raise ValueError("--video works for s2r tasks only (gymnasium envs render themselves)")
        from s2r.sim.render import EnvRenderer

        renderer = EnvRenderer(env)
    obs = env.reset(seed=seed)
    returns = torch.zeros(episodes)
    lengths = torch.zeros(episodes, dtype=torch.long)
    done = torch.zeros(episodes, dtype=torch.bool)
    success = torch.zeros(episodes, dtype=torch.bool)
    for _ in range((env.max_episode_steps or 10_000) + 5):
        p = obs["policy"]
        a = agent.act(obs_norm.normalize(p) if cfg.normalize_obs else p, deterministic=True)
        obs, r, term, trunc, info = env.step(a)
        returns += torch.where(done, torch.zeros_like(r), r.cpu())
        lengths += (~done).long()
        if "success" in info:
            success |= info["success"].cpu() & ~done
        if renderer is not None and not done[0]:
            frames.append(renderer.frame(0))
        done |= (term | trunc).cpu()
        if done.all():
            break
    out = {"checkpoint": str(path), "env_steps": int(ck["env_steps"]), "episodes": episodes,
           "return_mean": float(returns.mean()), "return_std": float(returns.std(unbiased=False)),
           "length_mean": float(lengths.float().mean())}
    if "success" in info:
        out["success_rate"] = float(success.float().mean())
    if renderer is not None:
        from s2r.sim.render import write_video

        write_video(str(video), frames, fps=1.0 / env.control_dt)
        renderer.close()
        out["video"] = str(video)
    env.close()
    return out

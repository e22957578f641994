"""Training recipes: a tuned TrainConfig per task, algorithm and policy head.

`recipe(task, algo, policy)` starts from the algorithm's paper defaults
(policies/algorithms.py: algo_defaults) and applies the task's settings.
Small-budget recipes (Pendulum, InvertedPendulum) are what CI learns with; the
massively parallel ones follow FastSAC/LIFT (many envs, large batches, LayerNorm
critics, gamma 0.97 for locomotion) and are meant for a GPU.

The observation normaliser's scale floor (TrainConfig.obs_norm_min_std, default 1: small-spread
dims centred, not amplified) was measured on the Gymnasium MuJoCo locomotion tasks (Walker2d,
Hopper, HalfCheetah; docs/BENCHMARKS.md, Learning quality); every recipe that was tuned and
measured with plain standardisation (the CI tasks, the s2r robots, Isaac-Cartpole) pins
obs_norm_min_std=0.0, so its numbers and its shipped policies stay as they were. Walker2d-v5 learns
better with no normaliser at all (normalize_obs=False), HalfCheetah-v5 much worse (docs/TRAINING.md).
A task without a recipe gets GENERIC below: the floored normaliser with its divisor capped at 3,
normalised rewards and 3-step returns.
"""

from __future__ import annotations

import dataclasses

from s2r.policies.algorithms import AgentConfig, algo_defaults
from s2r.policies.trainer import TrainConfig

# Reward normalisation as the recipes use it: rewards x 10 / std(G), G the discounted return over the random warm-up,
# frozen there. A constant factor on the rewards cancels, and 10 lands near the raw scale of the Gymnasium locomotion
# tasks (std(G) 4.7-15.9 over their warm-ups), where SAC's and DSAC-T's initial temperatures and learning rates were
# tuned. At 30k steps (3 seeds) s2r SAC with it was at or above SB3 SAC on Walker2d, Hopper and HalfCheetah, and
# DSAC-T with it at or above SAC on Walker2d and Hopper (docs/BENCHMARKS.md). The recipes measured without it keep it
# off.
REWARD_NORM = dict(reward_norm=True, freeze_reward_norm=True, reward_norm_std=10.0)

# The generic setting, for a task without a recipe: REWARD_NORM, observations centred and divided by their std where
# it is above 1, by at most 3 (obs_norm_max_std=3, `s2r train --obs-norm capped`), and 3-step returns (n_step=3).
# Without the 3-step returns its last-5 mean at 30k steps (five seeds) was 0.95 and 0.92 of SB3 SAC's on Walker2d and
# Hopper; with them it is 1.45 and 2.47 (bootstrap 90 % intervals 1.34-1.60 and 1.29-4.06), and 12x on HalfCheetah,
# and Walker2d no longer falls back after an early peak (docs/BENCHMARKS.md, "3-step returns").
# The cap: dividing by the full std (`--obs-norm scale`) made Walker2d peak early and fall back (0.82 of SB3), centring
# only (`--obs-norm centre`) left HalfCheetah near SB3's start; the cap keeps most of both (docs/TRAINING.md).
GENERIC = dict(REWARD_NORM, obs_norm_max_std=3.0, n_step=3)

# task -> (TrainConfig fields, AgentConfig fields)
RECIPES: dict[str, tuple[dict, dict]] = {
    "Pendulum-v1": (dict(num_envs=1, total_steps=10_000, learning_starts=1_000, batch_size=256,
                         eval_every=2_000, eval_episodes=5, checkpoint_every=4_000, buffer_size=100_000,
                         obs_norm_min_std=0.0),
                    dict(actor_hidden=(64, 64), critic_hidden=(64, 64), lr_actor=1e-3, lr_critic=1e-3,
                         lr_alpha=1e-3, init_alpha=1.0)),
    "InvertedPendulum-v5": (dict(num_envs=1, total_steps=10_000, learning_starts=1_000, batch_size=256,
                                 eval_every=2_500, eval_episodes=5, checkpoint_every=5_000, buffer_size=100_000,
                                 obs_norm_min_std=0.0),
                            dict(actor_hidden=(64, 64), critic_hidden=(64, 64), lr_actor=1e-3, lr_critic=1e-3,
                                 lr_alpha=1e-3, init_alpha=1.0)),
    # The three Gymnasium locomotion recipes keep 1-step returns: DSAC-T's numbers were measured with them. For
    # SAC, 3-step returns (`--set n_step=3`, as in GENERIC) scored higher at 30k steps on Walker2d and Hopper
    # (docs/TRAINING.md)
    "Hopper-v5": (dict(num_envs=1, total_steps=300_000, learning_starts=5_000, eval_every=10_000, **REWARD_NORM),
                  dict()),
    "HalfCheetah-v5": (dict(num_envs=1, total_steps=300_000, learning_starts=5_000, eval_every=10_000,
                            **REWARD_NORM),
                       dict()),
    # no observation normaliser: at 30k steps (3 seeds) SAC's last-5 mean was 396 without it, 258 with the
    # floored one and 338 for SB3 SAC; its early peak and fall-back were the normaliser's (docs/BENCHMARKS.md)
    "Walker2d-v5": (dict(num_envs=1, total_steps=300_000, learning_starts=5_000, eval_every=10_000,
                         normalize_obs=False, **REWARD_NORM),
                    dict()),
    "humanoid-walk": (dict(num_envs=1024, total_steps=50_000_000, learning_starts=100_000, batch_size=8192,
                           updates_per_step=8, buffer_size=10_000_000, eval_every=1_000_000,
                           checkpoint_every=2_000_000, n_step=3, device="cuda", obs_norm_min_std=0.0),
                      dict(actor_hidden=(512, 256, 128), critic_hidden=(768, 384, 192), layer_norm=True,
                           gamma=0.97, tau=0.1, init_alpha=0.001, log_std_min=-5.0, log_std_max=0.0,
                           lr_actor=3e-4, lr_critic=3e-4, bf16=True)),
    # CPU-sized: the standing policy of the ROS 2 sim-to-sim test and `make demo` (2 cores, minutes)
    "humanoid-stand": (dict(num_envs=32, total_steps=1_500_000, learning_starts=20_000, batch_size=512,
                            updates_per_step=2, buffer_size=1_000_000, eval_every=100_000, eval_episodes=4,
                            checkpoint_every=100_000, n_step=3, obs_norm_min_std=0.0),
                       dict(actor_hidden=(256, 256), critic_hidden=(256, 256), layer_norm=True, gamma=0.97,
                            tau=0.02, init_alpha=0.01, log_std_max=0.0)),
    # Isaac Lab (sim/isaaclab.py, .venv-isaac), sized for the CPU: a Newton/MuJoCo Warp step costs about
    # the same for 4 or 64 envs (Python kernel launches dominate), the gradient updates set the pace
    # (16 per env step). Rewards are Isaac Lab's (x step_dt = 1/60): reward_scale 60 gives SAC per-step
    # rewards of ~1. Solves Isaac-Cartpole (deterministic return >= 4.5 of 5.0; docs/ISAAC.md).
    "isaaclab:Isaac-Cartpole": (dict(num_envs=32, total_steps=48_000, learning_starts=2_048, batch_size=256,
                                     updates_per_step=16, buffer_size=200_000, reward_scale=60.0, n_step=3,
                                     eval_every=24_000, eval_episodes=16, checkpoint_every=24_000,
                                     log_every=3_200, obs_norm_min_std=0.0),
                                dict(actor_hidden=(64, 64), critic_hidden=(64, 64), lr_actor=1e-3, lr_critic=1e-3,
                                     lr_alpha=1e-3, init_alpha=0.1, tau=0.02)),
    "arm-reach": (dict(num_envs=32, total_steps=400_000, learning_starts=10_000, batch_size=1024,
                       updates_per_step=4, eval_every=50_000, n_step=1, obs_norm_min_std=0.0),
                  dict(layer_norm=True, gamma=0.97)),
    "arm-pick": (dict(num_envs=64, total_steps=5_000_000, learning_starts=50_000, batch_size=4096,
                      updates_per_step=8, eval_every=250_000, n_step=3, obs_norm_min_std=0.0),
                 dict(layer_norm=True, gamma=0.97, critic_hidden=(512, 512, 256), actor_hidden=(256, 256, 128))),
}
RECIPES["isaaclab:Isaac-Cartpole-Direct"] = RECIPES["isaaclab:Isaac-Cartpole"]  # same robot, rewards and rates


def recipe(task: str, algo: str = "sac", policy: str = "gaussian", **overrides) -> TrainConfig:
    """The recipe for `task` (or the generic setting: the algorithm's defaults and GENERIC), then overrides."""
    train_kw, agent_kw = RECIPES.get(task, (GENERIC, {}))
    a = {**algo_defaults(algo), **agent_kw, "algo": algo, "policy": policy}
    agent_over = overrides.pop("agent", {}) or {}
    a.update(agent_over)
    known = {f.name for f in dataclasses.fields(AgentConfig)}
    bad = set(a) - known
    if bad:
        raise ValueError(f"unknown agent setting(s) {sorted(bad)}")
    cfg = TrainConfig(task=task, algo=algo, policy=policy, agent=AgentConfig(**a), **train_kw)
    if overrides.get("reward_norm") is False and overrides.get("freeze_reward_norm") is None:
        overrides["freeze_reward_norm"] = False  # normalisation switched off: nothing left to freeze
    for k, v in overrides.items():
        if v is None:
            continue
        if not hasattr(cfg, k):
            raise ValueError(f"unknown training setting '{k}'")
        setattr(cfg, k, v)
    import torch

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():  # GPU recipe on a CPU machine
        cfg.device = "cpu"
        cfg.agent.bf16 = False
    return cfg

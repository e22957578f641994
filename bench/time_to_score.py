"""Time to score: wall-clock for s2r to reach the return SB3 SAC reaches after a fixed budget.

    python bench/time_to_score.py [--quick] [--task Hopper-v5] [--sb3-steps 100000]
                                  [--algo sac] [--num-envs 1] [--utd 1] [--max-steps 200000] [--bf16]

1. SB3 SAC (defaults, learning_starts 5000, seed 0) learns `--sb3-steps` env steps; its
   training wall-clock and its deterministic return (10 episodes) are recorded.
2. s2r (`--algo`, `--num-envs`, `--utd`) trains, evaluating deterministically every
   `--eval-every` env steps; the clock (training only: evaluation time is subtracted) stops
   at the first evaluation whose mean return reaches SB3's.
Last line: JSON with time_to_score_ratio_vs_sb3 = s2r seconds / SB3 seconds (goal <= 0.5).
--quick: Pendulum-v1, SB3 for 3000 steps, s2r up to 6000 (<= 60 s on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from s2r.bench_util import machine_info, sb3_eval_return


def sb3_run(task: str, steps: int, seed: int, learning_starts: int) -> tuple[float, float]:
    import gymnasium as gym
    from stable_baselines3 import SAC

    env = gym.make(task)
    model = SAC("MlpPolicy", env, learning_starts=learning_starts, seed=seed, device="cpu", verbose=0)
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - t0
    env.close()
    return wall, sb3_eval_return(model, task, 10, 10_000)


def s2r_run(task: str, target: float, algo: str, num_envs: int, utd: float, max_steps: int,
            eval_every: int, seed: int, learning_starts: int, bf16: bool = False) -> dict:
    from s2r.policies.recipes import recipe
    from s2r.policies.trainer import Trainer

    cfg = recipe(task, algo, total_steps=max_steps, num_envs=num_envs, updates_per_step=utd * num_envs,
                 seed=seed, progress=False, eval_every=eval_every, eval_episodes=10,
                 checkpoint_every=10**12, learning_starts=learning_starts, threads=torch.get_num_threads(),
                 agent={"bf16": bf16})
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d)
        eval_time = [0.0]
        reached: dict = {}
        real_eval = tr.evaluate
        t0 = time.perf_counter()

        def timed_eval(episodes=None):
            t = time.perf_counter()
            out = real_eval(episodes)
            eval_time[0] += time.perf_counter() - t
            if not reached and out["return_mean"] >= target:
                reached.update(env_steps=out["env_steps"], seconds=time.perf_counter() - t0 - eval_time[0],
                               return_mean=out["return_mean"])
                tr.cfg.total_steps = tr.env_steps  # stop the loop
            return out

        tr.evaluate = timed_eval
        tr.train()
        return reached or {"env_steps": None, "seconds": None, "last_return": tr.eval_history[-1]["return_mean"]}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--task", default="Hopper-v5")
    p.add_argument("--sb3-steps", type=int, default=100_000)
    p.add_argument("--algo", default="sac")
    p.add_argument("--num-envs", type=int, default=1)
    p.add_argument("--utd", type=float, default=1.0, help="updates per env step")
    p.add_argument("--max-steps", type=int, default=200_000)
    p.add_argument("--eval-every", type=int, default=5_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="s2r with bf16 autocast (CPUs with AVX512-BF16/AMX)")
    a = p.parse_args()
    if a.quick:
        a.task, a.sb3_steps, a.max_steps, a.eval_every = "Pendulum-v1", 3_000, 6_000, 1_000
    torch.set_num_threads(a.threads)
    starts = min(5_000, a.sb3_steps // 4)
    sb3_wall, sb3_ret = sb3_run(a.task, a.sb3_steps, 0, starts)
    print(f"SB3 SAC: {a.sb3_steps} steps in {sb3_wall:.1f} s, deterministic return {sb3_ret:.1f}", flush=True)
    r = s2r_run(a.task, sb3_ret, a.algo, a.num_envs, a.utd, a.max_steps, a.eval_every, 0, starts, a.bf16)
    print(f"s2r {a.algo}: {r}", flush=True)
    out = {"bench": "time_to_score", "quick": a.quick, "task": a.task, "machine": machine_info(),
           "sb3_steps": a.sb3_steps, "sb3_seconds": round(sb3_wall, 1), "sb3_return": round(sb3_ret, 1),
           "s2r": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()},
           "s2r_config": {"algo": a.algo, "num_envs": a.num_envs, "utd": a.utd, "bf16": a.bf16},
           "threads": a.threads}
    out["time_to_score_ratio_vs_sb3"] = round(r["seconds"] / sb3_wall, 3) if r.get("seconds") else None
    return out


if __name__ == "__main__":
    print(json.dumps(main()))

"""Helpers shared by the bench/ scripts: what machine a number came from, and SB3 evaluation."""

from __future__ import annotations

import os
import platform


def machine_info() -> dict:
    import gymnasium
    import mujoco
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__, "torch": torch.__version__}


def sb3_eval_return(model, task: str, episodes: int, seed: int) -> float:
    """Mean deterministic return of an SB3 model over `episodes` fresh gymnasium episodes."""
    import gymnasium as gym

    env = gym.make(task)
    rets = []
    for e in range(episodes):
        obs, _ = env.reset(seed=seed + e)
        done, ret = False, 0.0
        while not done:
            a, _ = model.predict(obs, deterministic=True)
            obs, r, term, trunc, _ = env.step(a)
            ret += float(r)
            done = term or trunc
        rets.append(ret)
    env.close()
    return sum(rets) / len(rets)

"""Helpers shared by the bench/ scripts: what machine a number came from, SB3 evaluation, and the
learner's gradient updates/s (bench/train_speed.py on the CPU, bench/gpu_check.py on a GPU)."""

from __future__ import annotations

import os
import platform
import time


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


def fake_batch(B: int, obs: int, act: int, critic_obs: int | None = None, device: str = "cpu") -> dict:
    """A replay batch of B random transitions, shaped as ReplayBuffer.sample returns it ([B, ...])."""
    import torch

    g = torch.Generator().manual_seed(0)
    c = obs if critic_obs is None else critic_obs
    b = {k: torch.randn(B, d, generator=g) for k, d in
         (("obs", obs), ("critic_obs", c), ("action", act), ("next_obs", obs), ("next_critic_obs", c))}
    b["action"] = b["action"].clamp(-1, 1)
    b.update(reward=torch.randn(B, generator=g), done=torch.zeros(B), discount=torch.full((B,), 0.99))
    return {k: v.to(device) for k, v in b.items()}


def updates_per_s(agent_cfg, obs: int, critic_obs: int, act: int, B: int, seconds: float,
                  device: str = "cpu", warmup: int = 5) -> float:
    """Gradient updates/s of a fresh agent (policies/algorithms.py) on one fixed batch of B: the learner
    alone, no sampling or simulation. `warmup` updates first (torch.compile compiles in them); then at
    least `seconds` and 3 updates, timed to the end of the device's queued work."""
    import torch

    from s2r.policies.algorithms import make_agent

    ag = make_agent(agent_cfg, obs, critic_obs, act, device)
    batch = fake_batch(B, obs, act, critic_obs, device)
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        ag.update(batch)
    if cuda:
        torch.cuda.synchronize(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        ag.update(batch)
        n += 1
    if cuda:
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)

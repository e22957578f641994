"""Helpers shared by the bench/ scripts: what machine a number came from, SB3 evaluation, and the
learner's gradient updates/s and the world model's imagined transitions/s (bench/train_speed.py and
bench/world_model.py on the CPU, bench/gpu_check.py on a GPU)."""

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


def imagined_speed(dm, B: int = 4096, steps: int = 3, seconds: float = 3.0, device: str = "cpu") -> dict:
    """Imagined transitions/s of dm.predict (world_models/diffusion.py) at batch B with `steps` Euler steps,
    against the same denoiser's matmuls at the same shapes as a raw torch.mm chain (the ceiling a fused
    network could reach on this device). Timed to the end of the device's queued work."""
    import torch

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    c = dm.cfg
    dm.to(device)
    s = torch.randn(B, c.history, c.state_dim, device=device)
    a = torch.rand(B, c.history, c.action_dim, device=device) * 2 - 1

    def timed(fn) -> float:  # seconds per call: one warm-up call, then at least `seconds` and 2 calls
        fn()
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            fn()
            n += 1
        sync()
        return (time.perf_counter() - t0) / n

    with torch.no_grad():
        per_s = B / timed(lambda: dm.predict(s, a, steps=steps))
    # the matmuls of one denoiser evaluation: emb MLP (2), input layer, per block film + fc1 + fc2, output
    shapes = [(B, c.emb_dim, c.emb_dim)] * 2 + [(B, c.target_dim + c.cond_dim, c.width)]
    shapes += [(B, c.emb_dim, 2 * c.width), (B, c.width, c.width), (B, c.width, c.width)] * c.blocks
    shapes += [(B, c.width, c.target_dim)]
    mats = [tuple(torch.randn(*sh, device=device) for sh in ((m, k_), (k_, n_))) + (torch.empty(m, n_, device=device),)
            for m, k_, n_ in shapes]
    flops = 2 * sum(m * k_ * n_ for m, k_, n_ in shapes) * steps

    def chain() -> None:
        for _ in range(steps):
            for x, w, o in mats:
                torch.mm(x, w, out=o)

    wall = timed(chain)
    ceiling = B / wall
    return {"imagined_per_s": per_s, "matmul_ceiling_per_s": ceiling, "share_of_ceiling": per_s / ceiling,
            "matmul_gflops": flops / wall / 1e9, "batch": B, "sampling_steps": steps, "device": device,
            "network": f"width {c.width}, {c.blocks} blocks"}

"""Training speed benchmark: s2r SAC vs stable-baselines3 SAC, in one run on one machine.

    python bench/train_speed.py [--quick] [--threads N]

Measures, side by side (same torch thread count, same network sizes 2x256, same batch):
  1. gradient updates/s at batch 256 and at batch 4096 (replay already filled), s2r in float32
     and, on CPUs with native bf16 (AVX512-BF16/AMX), with bf16 autocast (`--bf16`);
  2. the compute ceiling: FLOPs of one s2r update (torch's FlopCounterMode: forward + backward
     matmuls) against measured matmul GFLOP/s at the same shapes -> updates/s if the update
     were pure matmul;
  3. end-to-end training env steps/s on Hopper-v5 (1 env, 1 update per step, after warm-up).
Last line: one JSON object with updates_per_s_ratio_vs_sb3 (batch 256, float32 like for like)
and updates_per_s_ratio_vs_sb3_bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from s2r.bench_util import fake_batch, machine_info, sb3_eval_return, updates_per_s
from s2r.policies.algorithms import AgentConfig, make_agent

OBS, ACT = 17, 6  # HalfCheetah-v5 sizes (SB3 builds its nets from that env)


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls only pay off on CPUs with native support (AVX512-BF16 or AMX); elsewhere skip."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def s2r_updates_per_s(B: int, seconds: float, algo: str = "sac", bf16: bool = False) -> float:
    cfg = AgentConfig(algo=algo, actor_hidden=(256, 256), critic_hidden=(256, 256), activation="relu",
                      policy_delay=1, bf16=bf16)
    return updates_per_s(cfg, OBS, OBS, ACT, B, seconds)


def sb3_model(buffer_size: int = 10_000):
    import gymnasium as gym
    from stable_baselines3 import SAC

    env = gym.make("HalfCheetah-v5")  # obs 17, act 6: the sizes above
    model = SAC("MlpPolicy", env, buffer_size=buffer_size, learning_starts=0, device="cpu", seed=0, verbose=0)
    return model, env


def sb3_updates_per_s(B: int, seconds: float) -> float:
    model, env = sb3_model()
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((1, OBS)).astype(np.float32)
    for _ in range(5000):  # fill the buffer directly (no simulation in the timed part)
        model.replay_buffer.add(obs, rng.standard_normal((1, OBS)).astype(np.float32),
                                rng.uniform(-1, 1, (1, ACT)).astype(np.float32), np.zeros(1), np.zeros(1), [{}])
    model._setup_learn(total_timesteps=1, progress_bar=False)
    model.train(gradient_steps=5, batch_size=B)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        model.train(gradient_steps=1, batch_size=B)
        n += 1
    env.close()
    return n / (time.perf_counter() - t0)


def flops_per_update(B: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    ag = make_agent(AgentConfig(algo="sac", actor_hidden=(256, 256), critic_hidden=(256, 256), policy_delay=1),
                    OBS, OBS, ACT)
    batch = fake_batch(B, OBS, ACT)
    ag.update(batch)
    with FlopCounterMode(display=False) as fc:
        ag.update(batch)
    return float(fc.get_total_flops())


def matmul_gflops(B: int, seconds: float, dtype: torch.dtype = torch.float32) -> float:
    a, w = torch.randn(B, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
    for _ in range(10):
        a @ w
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ w
        n += 1
    return 2 * B * 256 * 256 * n / (time.perf_counter() - t0) / 1e9


def s2r_train_sps(steps: int, warm: int) -> float:
    """Whole `Trainer.train()` wall time (random warm-up, learning, a final 1-episode eval)."""
    import tempfile

    from s2r.policies.recipes import recipe
    from s2r.policies.trainer import Trainer

    with tempfile.TemporaryDirectory() as d:
        cfg = recipe("Hopper-v5", "sac", total_steps=warm + steps, learning_starts=warm, eval_every=10**9,
                     checkpoint_every=10**9, progress=False, eval_episodes=1, threads=torch.get_num_threads())
        tr = Trainer(cfg, d)
        t0 = time.perf_counter()
        tr.train()
        return (warm + steps) / (time.perf_counter() - t0)


def sb3_train_sps(steps: int, warm: int) -> float:
    import gymnasium as gym
    from stable_baselines3 import SAC

    env = gym.make("Hopper-v5")
    model = SAC("MlpPolicy", env, learning_starts=warm, device="cpu", seed=0, verbose=0)
    t0 = time.perf_counter()
    model.learn(total_timesteps=warm + steps)
    total = time.perf_counter() - t0
    env.close()
    return (warm + steps) / total


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for BOTH sides")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sec = 3.0 if a.quick else 10.0
    res: dict = {"bench": "train_speed", "quick": a.quick, "threads": a.threads, "machine": machine_info()}
    import stable_baselines3

    res["machine"]["stable_baselines3"] = stable_baselines3.__version__
    bf16_ok = cpu_has_native_bf16()
    res["cpu_native_bf16"] = bf16_ok
    for B in (256, 4096):
        s, h, b = [], [], []
        for _ in range(1 if a.quick else 2):  # interleave to share the machine's noise
            s.append(s2r_updates_per_s(B, sec))
            if bf16_ok:
                h.append(s2r_updates_per_s(B, sec, bf16=True))
            b.append(sb3_updates_per_s(B, sec))
        res[f"s2r_updates_per_s_b{B}"] = round(max(s), 2)
        res[f"sb3_updates_per_s_b{B}"] = round(max(b), 2)
        res[f"ratio_b{B}"] = round(max(s) / max(b), 3)
        f = flops_per_update(B)
        g = matmul_gflops(B, 1.0)
        res[f"flops_per_update_b{B}"] = f
        res[f"matmul_gflops_b{B}"] = round(g, 2)
        res[f"ceiling_updates_per_s_b{B}"] = round(g * 1e9 / f, 2)
        res[f"fraction_of_ceiling_b{B}"] = round(max(s) / (g * 1e9 / f), 3)
        if h:  # bf16 autocast (float32 master weights and output layers): the option CUDA users get
            g16 = matmul_gflops(B, 1.0, torch.bfloat16)
            res[f"s2r_bf16_updates_per_s_b{B}"] = round(max(h), 2)
            res[f"ratio_bf16_b{B}"] = round(max(h) / max(b), 3)
            res[f"matmul_gflops_bf16_b{B}"] = round(g16, 2)
            res[f"fraction_of_bf16_ceiling_b{B}"] = round(max(h) / (g16 * 1e9 / f), 3)
        print(f"batch {B}: s2r {max(s):.1f} upd/s (bf16 autocast {max(h) if h else float('nan'):.1f}), SB3 {max(b):.1f} upd/s, ceiling {g * 1e9 / f:.1f} upd/s "
              f"({f / 1e9:.2f} GFLOP/update at {g:.1f} GFLOP/s)", flush=True)
    steps, warm = (1500, 500) if a.quick else (10_000, 1_000)
    s2r_sps = s2r_train_sps(steps, warm)
    sb3_sps = sb3_train_sps(steps, warm)
    res.update(s2r_train_env_steps_per_s=round(s2r_sps, 2), sb3_train_env_steps_per_s=round(sb3_sps, 2),
               train_sps_ratio_vs_sb3=round(s2r_sps / sb3_sps, 3), train_steps_measured=warm + steps)
    print(f"end-to-end Hopper-v5 training: s2r {s2r_sps:.1f} env steps/s, SB3 {sb3_sps:.1f}", flush=True)
    res["updates_per_s_ratio_vs_sb3"] = res["ratio_b256"]  # float32, like for like
    res["updates_per_s_ratio_vs_sb3_bf16"] = res.get("ratio_bf16_b256")
    return res


if __name__ == "__main__":
    print(json.dumps(main()))

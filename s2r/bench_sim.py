"""Simulation throughput benchmark (bench/sim_throughput.py and `s2r bench sim`).

Measures, in one run and interleaved per env count, physics steps per second:
  (a) gymnasium's humanoid.xml through the s2r batched API (task mjcf-locomotion,
      spec sim/robots/gym_humanoid/humanoid.yaml: same model, frame skip 5) against
      gymnasium's own Sync and Async vector envs on Humanoid-v5
      (physics steps/s = env steps/s x frame_skip);
  (b) humanoid-walk (the repo's G1) through the s2r API;
  (c) the ceiling for each model: the exact rollout calls the s2r run made (same
      initial states, same controls, same per-env models, same 2-thread pool),
      replayed with raw `mujoco.rollout` and nothing else, so the state
      distribution is identical and the gap is s2r's own overhead.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from s2r.bench_util import machine_info

ASYNC_MAX_ENVS = 64  # AsyncVectorEnv forks one process per env: beyond this it only thrashes 2 cores


class _Recorder:
    """Wraps a MujocoBackend.step to record each call's inputs for the ceiling replay."""

    def __init__(self, backend):
        self.backend = backend
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []
        self._step = backend.step
        backend.step = self.step

    def step(self, ctrl):
        self.calls.append((self.backend.state.copy(), ctrl.detach().to(torch.float64).numpy().copy()))
        return self._step(ctrl)


def s2r_physics_steps_per_s(task: str, spec: str | None, n: int, seconds: float, record: bool = False,
                            backend: str = "mujoco", device: str = "cpu", randomize: bool | None = None):
    """Physics steps/s (env steps/s x decimation) of `n` envs through BatchedEnv.step under random
    actions, after 5 warm-up steps, for at least `seconds` and 10 steps. -> (rate, env, recorder);
    the env is left open (the ceiling replay reads its backend). bench/gpu_check.py runs it on `warp`."""
    from s2r.sim import BatchedEnv, EnvConfig

    env = BatchedEnv(EnvConfig(task=task, spec=spec, num_envs=n, seed=0, backend=backend, device=device,
                               randomize=randomize))
    env.reset()
    gen = torch.Generator().manual_seed(0)
    acts = [(torch.rand(n, env.action_dim, generator=gen) * 2 - 1).to(env.device) for _ in range(64)]
    for k in range(5):  # warm-up (the warp backend captures its step graph here)
        env.step(acts[k])
    rec = _Recorder(env.backend) if record else None
    _sync(env.device)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 10:
        env.step(acts[steps % 64])
        steps += 1
    _sync(env.device)
    wall = time.perf_counter() - t0
    pps = steps * n * env.decimation / wall
    return pps, env, rec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ceiling(env, rec: _Recorder) -> float:
    """Replay the recorded rollout calls with raw mujoco.rollout (best of 2 passes)."""
    be = env.backend
    n, nstep = rec.calls[0][1].shape[:2]
    state = np.zeros((n, nstep, be.nstate))
    sens = np.zeros((n, nstep, be.model.nsensordata))
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        for s0, ctrl in rec.calls:
            be._pool.rollout(be._models, be._datas, s0, ctrl, nstep=nstep, state=state,
                             sensordata=sens, skip_checks=True)
        best = max(best, len(rec.calls) * n * nstep / (time.perf_counter() - t0))
    return best


def _gym(n: int, mode: str, seconds: float) -> float:
    import gymnasium as gym

    envs = gym.make_vec("Humanoid-v5", num_envs=n, vectorization_mode=mode)
    frame_skip = envs.unwrapped.env_fns[0]().unwrapped.frame_skip if hasattr(envs.unwrapped, "env_fns") else 5
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    acts = [rng.uniform(-0.4, 0.4, (n, 17)).astype(np.float32) for _ in range(64)]
    for k in range(5):
        envs.step(acts[k])
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 10:
        envs.step(acts[steps % 64])
        steps += 1
    wall = time.perf_counter() - t0
    envs.close()
    return steps * n * frame_skip / wall


def run(counts: list[int], quick: bool = False) -> dict:
    torch.set_num_threads(1)
    if quick:
        counts = [c for c in counts if c in (16, 64)] or counts[:2]
    seconds = 1.5 if quick else 6.0
    rows = []
    for n in counts:
        row: dict = {"num_envs": n}
        pps, env, rec = s2r_physics_steps_per_s("mjcf-locomotion", "gym_humanoid/humanoid.yaml", n, seconds,
                                                record=True)
        row["s2r_gym_humanoid"] = pps
        row["ceiling_gym_humanoid"] = _ceiling(env, rec)
        env.close()
        pps, env, rec = s2r_physics_steps_per_s("humanoid-walk", None, n, seconds, record=True)
        row["s2r_humanoid_walk"] = pps
        row["ceiling_humanoid_walk"] = _ceiling(env, rec)
        env.close()
        row["gym_sync"] = _gym(n, "sync", seconds)
        row["gym_async"] = _gym(n, "async", seconds) if n <= ASYNC_MAX_ENVS and not (quick and n > 16) else None
        row["gym_best"] = max(v for v in (row["gym_sync"], row["gym_async"]) if v is not None)
        row["ratio_vs_gymnasium"] = row["s2r_gym_humanoid"] / row["gym_best"]
        row["fraction_of_ceiling_gym_humanoid"] = row["s2r_gym_humanoid"] / row["ceiling_gym_humanoid"]
        row["fraction_of_ceiling_humanoid_walk"] = row["s2r_humanoid_walk"] / row["ceiling_humanoid_walk"]
        rows.append({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
        print(f"  n={n:4d}  s2r(gym humanoid) {row['s2r_gym_humanoid']:9.0f}  gym sync {row['gym_sync']:9.0f}  "
              f"gym async {row['gym_async'] or float('nan'):9.0f}  ceiling {row['ceiling_gym_humanoid']:9.0f}  "
              f"| humanoid-walk {row['s2r_humanoid_walk']:9.0f} / ceiling {row['ceiling_humanoid_walk']:9.0f}"
              "  (physics steps/s)", flush=True)
    best_s2r = max(r["s2r_gym_humanoid"] for r in rows)
    best_gym = max(r["gym_best"] for r in rows)
    top = max(rows, key=lambda r: r["num_envs"])
    return {
        "bench": "sim_throughput", "quick": quick, "unit": "physics steps/s", "machine": machine_info(),
        "rows": rows,
        "ratio_vs_gymnasium": round(best_s2r / best_gym, 3),
        "fraction_of_ceiling": round(min(top["fraction_of_ceiling_gym_humanoid"],
                                         top["fraction_of_ceiling_humanoid_walk"]), 3),
        "notes": "ratio_vs_gymnasium: best s2r over env counts / best gymnasium mode over env counts, same "
                 "humanoid.xml and frame skip; fraction_of_ceiling: the smaller of the two models' s2r/ceiling "
                 f"at the largest env count ({top['num_envs']}).",
    }

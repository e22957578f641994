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

s2r and its ceiling are measured in PAIRED windows: a short s2r window k (recording its
rollout calls), then at once the replay of exactly window k's calls; PAIRS pairs per model.
A shared machine's load drifts over seconds (another job's bursts), so one long s2r window
followed by one long replay compared two different machines (the fraction moved by 0.15
from run to run); the two halves of a pair run within about a second of each other and see
the same load. fraction_of_ceiling_* is the MEDIAN over pairs of the pair's ratio (its replay
time / its s2r time, the same physics steps): a burst that hits only one half of one pair
moves that pair's ratio, not the median, whereas total replay time / total s2r time would
take it in by its duration. The rates s2r_* and ceiling_* are totals over the pairs (steps
/ time), so their quotient can differ slightly from the median; fraction_spread_* gives the
pairs' lowest and highest ratio.
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


def _warm_env(task: str, spec: str | None, n: int, backend: str = "mujoco", device: str = "cpu",
              randomize: bool | None = None):
    """-> (env, 64 random actions [n, A] on its device) after reset and 5 warm-up steps (the warp backend
    captures its step graph here); the steps that follow cycle through the actions from index 5."""
    from s2r.sim import BatchedEnv, EnvConfig

    env = BatchedEnv(EnvConfig(task=task, spec=spec, num_envs=n, seed=0, backend=backend, device=device,
                               randomize=randomize))
    env.reset()
    gen = torch.Generator().manual_seed(0)
    acts = [(torch.rand(n, env.action_dim, generator=gen) * 2 - 1).to(env.device) for _ in range(64)]
    for k in range(5):
        env.step(acts[k])
    return env, acts


def s2r_physics_steps_per_s(task: str, spec: str | None, n: int, seconds: float, backend: str = "mujoco",
                            device: str = "cpu", randomize: bool | None = None):
    """Physics steps/s (env steps/s x decimation) of `n` envs through BatchedEnv.step under random
    actions, after 5 warm-up steps, for at least `seconds` and 10 steps. -> (rate, env); the env is left
    open for the caller. bench/gpu_check.py runs it on `warp`."""
    env, acts = _warm_env(task, spec, n, backend, device, randomize)
    _sync(env.device)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 10:
        env.step(acts[steps % 64])
        steps += 1
    _sync(env.device)
    wall = time.perf_counter() - t0
    pps = steps * n * env.decimation / wall
    return pps, env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _replay(env, calls: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Seconds to replay the recorded rollout calls with raw mujoco.rollout (the backend's pool, models
    and per-thread data; the outputs go to scratch arrays, so the env's state is untouched)."""
    be = env.backend
    n, nstep = calls[0][1].shape[:2]
    state = np.zeros((n, nstep, be.nstate))
    sens = np.zeros((n, nstep, be.model.nsensordata))
    t0 = time.perf_counter()
    for s0, ctrl in calls:
        be._pool.rollout(be._models, be._datas, s0, ctrl, nstep=nstep, state=state, sensordata=sens,
                         skip_checks=True)
    return time.perf_counter() - t0


def paired_windows(s2r_window, ceiling_window, pairs: int) -> list[tuple[float, float]]:
    """[(s2r seconds, ceiling seconds)] of `pairs` pairs: s2r_window() -> (seconds, calls) runs s2r window k,
    then ceiling_window(calls) -> seconds replays exactly its calls, before window k + 1 starts."""
    out = []
    for _ in range(pairs):
        s2r_s, calls = s2r_window()
        out.append((s2r_s, ceiling_window(calls)))
    return out


def fraction_of_ceiling(pairs: list[tuple[float, float]]) -> float:
    """s2r / ceiling from paired windows: the median over pairs of ceiling seconds / s2r seconds (each pair
    steps the same physics twice). A load burst in one half of one pair moves one ratio, not the median."""
    return float(np.median([c / s for s, c in pairs]))


def s2r_vs_ceiling(task: str, spec: str | None, n: int, seconds: float, pairs: int) -> dict:
    """s2r (BatchedEnv.step under random actions, after 5 warm-up steps) against its ceiling in `pairs`
    paired windows of seconds / pairs each (at least 3 steps): physics steps/s of both over all pairs,
    fraction_of_ceiling over the pairs and the pairs' lowest and highest ratio."""
    env, acts = _warm_env(task, spec, n)
    try:
        rec = _Recorder(env.backend)
        window = seconds / pairs
        count = [5]  # steps so far: the actions go on cycling across windows

        def s2r_window():
            rec.calls = []
            steps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < window or steps < 3:
                env.step(acts[count[0] % 64])
                count[0] += 1
                steps += 1
            return time.perf_counter() - t0, rec.calls

        timed = paired_windows(s2r_window, lambda calls: _replay(env, calls), pairs)
        physics = (count[0] - 5) * n * env.decimation
        ratios = [c / s for s, c in timed]
        return {"env_steps": count[0] - 5, "s2r": physics / sum(s for s, _ in timed),
                "ceiling": physics / sum(c for _, c in timed),
                "fraction": fraction_of_ceiling(timed), "spread": (min(ratios), max(ratios))}
    finally:
        env.close()


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
    seconds = 1.5 if quick else 6.0  # of s2r per model and env count, in PAIRS windows (+ their replays)
    pairs = 6 if quick else 12
    rows = []
    for n in counts:
        row: dict = {"num_envs": n}
        for key, task, spec in (("gym_humanoid", "mjcf-locomotion", "gym_humanoid/humanoid.yaml"),
                                ("humanoid_walk", "humanoid-walk", None)):
            r = s2r_vs_ceiling(task, spec, n, seconds, pairs)
            row[f"s2r_{key}"], row[f"ceiling_{key}"] = r["s2r"], r["ceiling"]
            row[f"fraction_of_ceiling_{key}"] = r["fraction"]
            row[f"fraction_spread_{key}"] = [round(x, 3) for x in r["spread"]]
        row["gym_sync"] = _gym(n, "sync", seconds)
        row["gym_async"] = _gym(n, "async", seconds) if n <= ASYNC_MAX_ENVS and not (quick and n > 16) else None
        row["gym_best"] = max(v for v in (row["gym_sync"], row["gym_async"]) if v is not None)
        row["ratio_vs_gymnasium"] = row["s2r_gym_humanoid"] / row["gym_best"]
        rows.append({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
        print(f"  n={n:4d}  s2r(gym humanoid) {row['s2r_gym_humanoid']:9.0f}  gym sync {row['gym_sync']:9.0f}  "
              f"gym async {row['gym_async'] or float('nan'):9.0f}  ceiling {row['ceiling_gym_humanoid']:9.0f}  "
              f"({row['fraction_of_ceiling_gym_humanoid']:.3f})  | humanoid-walk {row['s2r_humanoid_walk']:9.0f} / "
              f"ceiling {row['ceiling_humanoid_walk']:9.0f} ({row['fraction_of_ceiling_humanoid_walk']:.3f})"
              "  (physics steps/s; fraction: median of paired windows)", flush=True)
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
                 f"at the largest env count ({top['num_envs']}), each the median over {pairs} paired windows "
                 "(s2r window k, then the replay of its rollout calls) of the pair's ratio.",
    }

"""s2r's per-step overhead outside physics, measured so that a shared machine's load does not decide it.

    python bench/sim_overhead.py [--quick] [--task humanoid-walk] [--spec YAML] [--envs 256] [--rounds 6]

bench/sim_throughput.py's fraction_of_ceiling compares a 6 s window of s2r with a later window of the
ceiling; when another job's load changes between the two, the fraction moves by 0.2 and more from run
to run. This script measures what the gap is made of, as CPU time of the stepping thread:

  1. one run of BatchedEnv.step under random actions in [-1, 1] (60 warm-up steps, then --steps),
     recording every rollout call's output arrays;
  2. --rounds replays of the same steps on fresh envs, each rollout call answered with its recorded
     output (same terminations, resets, randomisation and observations; the backend's own copies and
     divergence checks still run): env.step's CPU time per step, min and median over rounds, and one
     more replay with each env and task method timed;
  3. the physics of step 1: the rollout calls' CPU time over all threads, per step, and over the
     backend's thread count (about its wall time on idle cores).

s2r / ceiling on an idle machine is about physics / (physics + overhead). Prints one JSON object as
its last line.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time

import numpy as np
import torch

from s2r.bench_util import machine_info

WARMUP = 60  # steps: at 256 envs the random-action robots fall from step ~40 on; resets are then steady


class _RecordingPool:
    """Stands in for MujocoBackend's rollout pool: runs the real one and keeps its outputs and CPU time."""

    def __init__(self, pool):
        self.pool, self.outputs, self.cpu_s = pool, [], 0.0

    def rollout(self, *args, state, sensordata, **kw):
        t = time.process_time()
        self.pool.rollout(*args, state=state, sensordata=sensordata, **kw)
        self.cpu_s += time.process_time() - t
        self.outputs.append((state.copy(), sensordata.copy()))


class _ReplayPool:
    """Answers each rollout call with the next recorded output: the env's work without the physics."""

    def __init__(self, outputs):
        self.outputs = iter(outputs)

    def rollout(self, *args, state, sensordata, **kw):
        s, d = next(self.outputs)
        np.copyto(state, s)
        np.copyto(sensordata, d)


def _make(args):
    from s2r.sim import BatchedEnv, EnvConfig

    env = BatchedEnv(EnvConfig(task=args.task, spec=args.spec, num_envs=args.envs, seed=0, backend="mujoco"))
    env.reset()
    return env


def _actions(env, n=64):
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(env.num_envs, env.action_dim, generator=gen) * 2 - 1 for _ in range(n)]


def _timed_methods(env, totals):
    """Wrap the env's and task's step-time methods to add their CPU time to totals[name]."""
    def wrap(obj, name, label):
        f = getattr(obj, name)

        def timed(*a, **k):
            t = time.thread_time()
            try:
                return f(*a, **k)
            finally:
                totals[label] += time.thread_time() - t
        setattr(obj, name, timed)

    for name in ("process_action", "update", "terminated", "reward_terms", "refresh", "reset", "critic_terms",
                 "robot_state"):
        wrap(env.task, name, f"task.{name}")
    for name in ("_observe", "_reset_envs", "_push", "_check_action"):
        wrap(env, name, f"env.{name}")
    for name in ("step", "reset_envs", "set_params"):
        wrap(env.backend, name, f"backend.{name}")
    wrap(env.randomizer, "sample", "randomizer.sample")


def run(args) -> dict:
    torch.set_num_threads(1)
    env = _make(args)
    acts = _actions(env)
    rec = env.backend._pool = _RecordingPool(env.backend._pool)
    resets = 0
    for k in range(WARMUP + args.steps):
        if k == WARMUP:
            rec.cpu_s = 0.0
        _, _, term, trunc, _ = env.step(acts[k % len(acts)])
        resets += int((term | trunc).sum()) if k >= WARMUP else 0
    nthread, decimation = env.backend.nthread, env.decimation
    env.backend._pool = rec.pool
    env.close()

    def replay(sections=None):
        env = _make(args)
        real_pool, env.backend._pool = env.backend._pool, _ReplayPool(rec.outputs)
        for k in range(WARMUP):
            env.step(acts[k % len(acts)])
        if sections is not None:
            _timed_methods(env, sections)
        t = time.thread_time()
        for k in range(WARMUP, WARMUP + args.steps):
            env.step(acts[k % len(acts)])
        per_step = (time.thread_time() - t) / args.steps
        env.backend._pool = real_pool
        env.close()
        return per_step

    per_round = [replay() for _ in range(args.rounds)]
    sections: dict[str, float] = collections.defaultdict(float)
    replay(sections)
    physics = rec.cpu_s / args.steps
    ms = lambda s: round(1e3 * s, 3)  # noqa: E731
    return {
        "bench": "sim_overhead", "quick": args.quick, "task": args.task, "spec": args.spec, "num_envs": args.envs,
        "machine": machine_info(), "steps": args.steps, "resets_per_step": round(resets / args.steps, 2),
        "overhead_ms_per_step": {"min": ms(min(per_round)), "median": ms(statistics.median(per_round))},
        "physics_cpu_ms_per_step": ms(physics), "physics_threads": nthread,
        "physics_ms_per_step_on_idle_cores": ms(physics / nthread),
        "physics_steps_per_control_step": decimation,
        "sections_ms_per_step": {k: ms(v / args.steps) for k, v in sorted(sections.items(), key=lambda kv: -kv[1])},
        "notes": "overhead: CPU time of env.step per step with each rollout call answered from a recording of "
                 "the same run (min and median over rounds); sections: one more replay with each method timed "
                 "(nested methods counted in both; the timing adds to them); physics: the rollout calls' CPU "
                 "time over all threads in the recorded run.",
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="at most ~60 s: 64 envs, 40 steps, 3 rounds")
    p.add_argument("--task", default="humanoid-walk")
    p.add_argument("--spec", default=None, help="robot spec YAML (e.g. gym_humanoid/humanoid.yaml with "
                                                 "--task mjcf-locomotion)")
    p.add_argument("--envs", type=int, default=256)
    p.add_argument("--steps", type=int, default=100, help="measured steps after the warm-up")
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args()
    if a.quick:
        a.envs, a.steps, a.rounds = min(a.envs, 64), 40, 3
    if a.envs <= 0 or a.steps <= 0 or a.rounds <= 0:
        sys.exit("error: --envs, --steps and --rounds must be positive")
    print(json.dumps(run(a)))

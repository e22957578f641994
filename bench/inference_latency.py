"""Single-observation inference latency on one CPU thread: onnxruntime vs torch eager vs torch.compile.

    python bench/inference_latency.py [--quick] [--calls N]

What the robot node pays per control tick: one raw observation (numpy, obs 48 as humanoid-walk)
in, one action (13) out, normaliser included. For each shipped policy size
    sac-2x256          SAC default actor (relu)
    dsac-t-3x256       DSAC-T default actor (gelu)       goal: onnxruntime p99 <= 100 us
    humanoid-512-256-128  the humanoid-walk recipe's actor (relu)
it exports the same `DeterministicPolicy` (random weights, non-trivial normaliser statistics) and
times three callables that each take the numpy observation and return a numpy action:
    onnx     control/onnx_policy.OnnxPolicy (ORT, 1 thread, IOBinding: what the robot runs)
    eager    torch, 1 thread, inference_mode, preallocated input tensor
    compile  torch.compile(policy) (inductor, default mode), same call pattern
Warm-up first, then interleaved rounds (every backend of every model once per round, order rotated)
so drift on a shared machine hits all of them alike; each call is timed on its own
(perf_counter_ns), GC off while timing. The last line is one JSON object with `onnx_p99_us`
(the dsac-t-3x256 model) and every p50/p99.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import numpy as np
import torch

from s2r.bench_util import machine_info
from s2r.control.onnx_policy import (META_ACTION_DIM, META_ALGO, META_EXPORTER, META_OBS_DIM, META_POLICY_HEAD,
                                     META_RUN_ID, META_SPEC, META_SPEC_HASH, NO_SPEC, OnnxPolicy)
from s2r.policies.export import DeterministicPolicy, exporter_version, to_onnx_bytes
from s2r.policies.networks import TanhGaussianActor
from s2r.policies.normalizer import RunningNorm

OBS, ACT = 48, 13  # humanoid-walk (G1, 13 joints)
MODELS = {  # name -> (algo, hidden, activation)
    "sac-2x256": ("sac", (256, 256), "relu"),
    "dsac-t-3x256": ("dsac-t", (256, 256, 256), "gelu"),
    "humanoid-512-256-128": ("sac", (512, 256, 128), "relu"),
}
GOAL_MODEL, GOAL_P99_US = "dsac-t-3x256", 100.0


def build(name: str) -> tuple[DeterministicPolicy, bytes]:
    algo, hidden, act = MODELS[name]
    torch.manual_seed(0)
    actor = TanhGaussianActor(OBS, ACT, hidden, activation=act)
    norm = RunningNorm(OBS)
    norm.update(torch.randn(4096, OBS) * torch.rand(OBS) * 3 + torch.randn(OBS))
    policy = DeterministicPolicy(actor, norm)
    meta = {META_SPEC_HASH: NO_SPEC, META_SPEC: NO_SPEC, META_ALGO: algo, META_POLICY_HEAD: "gaussian",
            META_RUN_ID: f"bench-{name}", META_OBS_DIM: str(OBS), META_ACTION_DIM: str(ACT),
            META_EXPORTER: exporter_version(17)}
    return policy, to_onnx_bytes(policy, OBS, meta, 17)


def torch_callable(module):
    x = torch.zeros(1, OBS)  # [1, obs_dim], reused

    def call(obs: np.ndarray) -> np.ndarray:
        x.copy_(torch.from_numpy(obs))
        return module(x)[0].numpy()

    return call


def time_calls(call, pool: np.ndarray, n: int, start: int) -> list[int]:
    out = []
    for i in range(start, start + n):
        o = pool[i % len(pool)]
        t0 = time.perf_counter_ns()
        call(o)
        out.append(time.perf_counter_ns() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="at most ~60 s: 600 timed calls per backend")
    p.add_argument("--calls", type=int, default=None, help="timed calls per backend and model (default 5000)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (no C++ compiler)")
    a = p.parse_args()
    calls = a.calls or (600 if a.quick else 5000)
    rounds = 6 if a.quick else 10
    per_round = max(1, calls // rounds)
    torch.set_num_threads(1)
    pool = None
    backends: dict[tuple[str, str], object] = {}
    info: dict = {"compile_s": {}, "max_abs_diff_vs_eager": {}}
    with torch.inference_mode():
        for name in MODELS:
            policy, data = build(name)
            if pool is None:
                g = np.random.default_rng(0)
                mean, std = policy.obs_mean.numpy(), 1.0 / policy.obs_inv_std.numpy()
                pool = (mean + std * g.standard_normal((256, OBS))).astype(np.float32)  # [256, obs_dim]
            onnx_pol = OnnxPolicy(data)
            backends[(name, "onnx")] = onnx_pol
            backends[(name, "eager")] = torch_callable(policy)
            if not a.no_compile:
                t0 = time.perf_counter()
                try:
                    compiled = torch_callable(torch.compile(policy))
                    compiled(pool[0])
                    backends[(name, "compile")] = compiled
                except Exception as e:  # no compiler, unsupported platform: report, keep going
                    info.setdefault("compile_error", f"{type(e).__name__}: {str(e)[:200]}")
                info["compile_s"][name] = round(time.perf_counter() - t0, 2)
            ref = np.stack([backends[(name, "eager")](o).copy() for o in pool[:64]])
            info["max_abs_diff_vs_eager"][name] = {
                b: float(np.abs(np.stack([backends[(name, b)](o).copy() for o in pool[:64]]) - ref).max())
                for b in ("onnx", "compile") if (name, b) in backends}
        for call in backends.values():  # warm-up
            time_calls(call, pool, 300 if a.quick else 1000, 0)
        samples: dict[tuple[str, str], list[int]] = {k: [] for k in backends}
        keys = list(backends)
        gc.collect()
        gc.disable()
        try:
            for r in range(rounds):
                for k in keys[r % len(keys):] + keys[: r % len(keys)]:  # rotate the order each round
                    samples[k] += time_calls(backends[k], pool, per_round, r * per_round)
        finally:
            gc.enable()
    result: dict = {"bench": "inference_latency", "quick": a.quick, "obs_dim": OBS, "action_dim": ACT,
                    "threads": 1, "timed_calls_per_backend": rounds * per_round, "models": {}}
    print(f"{'model':22s} {'backend':8s} {'p50 us':>8s} {'p99 us':>8s} {'mean us':>8s}")
    for (name, b), ns in samples.items():
        us = np.asarray(ns) / 1e3
        row = {"p50_us": round(float(np.percentile(us, 50)), 2), "p99_us": round(float(np.percentile(us, 99)), 2),
               "mean_us": round(float(us.mean()), 2)}
        result["models"].setdefault(name, {})[b] = row
        print(f"{name:22s} {b:8s} {row['p50_us']:8.1f} {row['p99_us']:8.1f} {row['mean_us']:8.1f}")
    import onnxruntime

    onnx_p99 = result["models"][GOAL_MODEL]["onnx"]["p99_us"]
    result.update(onnx_p99_us=onnx_p99, onnx_p99_goal_us=GOAL_P99_US, onnx_p99_model=GOAL_MODEL,
                  onnx_p99_meets_goal=onnx_p99 <= GOAL_P99_US, **info,
                  machine={**machine_info(), "onnxruntime": onnxruntime.__version__,
                           "load_avg_1m": round(os.getloadavg()[0], 2)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()

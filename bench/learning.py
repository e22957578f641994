"""Learning benchmark: SAC, DSAC-T, SAC+PMOE, DSAC-T+PMOE and stable-baselines3 SAC side by side.

    python bench/learning.py [--quick] [--tasks Hopper-v5,HalfCheetah-v5,humanoid-walk] [--steps 100000]
                             [--seeds 0,1,2] [--methods sac,dsac-t,sac+pmoe,dsac-t+pmoe,sb3-sac]
                             [--reward-scales 1]  [--out out/bench_learning] [--workers 2]
                             [--variant NAME:key=value,agent.key=value ...] [--variants-only]

`sb3-sac-n3` is SB3 SAC with its 3-step returns (`n_steps=3`), the control for the s2r settings that use them.
Every method gets the same env-step budget and the same evaluation (deterministic policy,
5 episodes, every budget/10 steps). Runs execute in `--workers` parallel processes (one torch
thread each). Each finished run is written to --out/runs/ (atomically) and reused by a later
invocation with the same job, so a killed benchmark resumes and methods can be run in separate
invocations (e.g. `--methods sb3-sac` first) and summarised together. Writes curves.png and
results.json to --out; the last stdout line is a JSON summary per (task, method) and, with
--reward-scales, each --scale-methods method's scores at each reward scale (`TASK/METHOD@reward_xC`) and
its final and last-5 returns relative to scale 1 (`..._relative`, `..._relative_last5`).

Scores (mean +- std over seeds, and per seed): `final` (the last evaluation), `last5` (mean of the
last 5 evaluations: less at the mercy of one evaluation) and `auc` (area under the curve by the
trapezoid rule divided by the steps it spans: the time-averaged return, which also rewards learning
early). --quick adds `sac_vs_sb3_last5`, the smallest over the run's tasks of relative_score(s2r SAC
last5, SB3 SAC last5) = 1 + (s2r - sb3) / |sb3|: s2r / sb3 for positive returns, and for negative
ones (Pendulum) a gap of the same relative size scores the same (-200 against -150: 0.67).

--variant runs the s2r methods again with TrainConfig / AgentConfig settings changed (values are
YAML: false, 1.0, -20), reported as `method@NAME`, e.g. an ablation:
    --variant nonorm:normalize_obs=false --variant logstd20:agent.log_std_min=-20
With --reward-scales, each variant of the --scale-methods is also run at every scale (`method@NAME@reward_xC`).
A variant's runs are cached under a hash of its settings, so different settings never share a result.
--variants-only trains only the variant runs (when the base methods' runs are recorded elsewhere).
The cache key does not cover the code's defaults: after a default changes (obs_norm_min_std 0 -> 1 on
2026-11-27), summarise with a fresh --out, or name the old setting as a variant.

humanoid-walk: SB3 trains on the gymnasium id s2r/HumanoidWalk-v0 (one env, the task's own
randomisation); the s2r methods use the CPU-sized parallel setting in CPU_PARALLEL below
(16 envs, one update per 8 env steps, batch 512) at the same env-step budget.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from s2r.bench_util import sb3_eval_return

# s2r task name -> the gymnasium id SB3 trains on (gymnasium tasks are their own ids)
SB3_IDS = {"humanoid-walk": "s2r/HumanoidWalk-v0"}
# the stable-baselines3 methods: SB3 SAC at its defaults, and with its n-step returns (n_steps) as a control for
# s2r settings that use them
SB3_METHODS = {"sb3-sac": 1, "sb3-sac-n3": 3}
# CPU-sized massively parallel setting for the s2r tasks (the recipes' GPU settings do not fit 2 cores)
CPU_PARALLEL = {
    "humanoid-walk": dict(num_envs=16, batch_size=512, updates_per_step=2, n_step=3, device="cpu",
                          buffer_size=1_000_000,
                          agent=dict(actor_hidden=(256, 256), critic_hidden=(256, 256), bf16=False)),
}


def job_path(out: Path, job: dict) -> Path:
    name = f"{job['task'].replace('/', '_')}__{job['method']}__s{job['seed']}__x{job['scale']:g}__{job['steps']}"
    over = job.get("overrides") or {}
    if over:  # the settings themselves (not the variant's name) pick the file
        name += f"__v{job['variant']}-{hashlib.sha1(json.dumps(over, sort_keys=True).encode()).hexdigest()[:10]}"
    return out / "runs" / f"{name}.json"


def parse_variant(text: str) -> tuple[str, dict]:
    """'nonorm:normalize_obs=false,agent.log_std_min=-20' -> ('nonorm', {...}); values parsed as YAML."""
    from s2r.policies.trainer import parse_setting

    name, sep, body = text.partition(":")
    if not sep or not name or not body or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--variant {text!r}: expected NAME:key=value[,key=value...] (NAME letters, digits, - _)")
    over = {}
    for item in re.split(r",(?=[A-Za-z_][\w.]*=)", body):  # a comma inside a value ([64,64]) stays
        try:
            key, v = parse_setting(item)
        except ValueError as e:
            raise ValueError(f"--variant {text!r}: {e}") from None
        over[key] = v
    return name, over


def last_k_mean(curve: list, k: int = 5) -> float:
    """Mean return of the last k evaluations of a curve [(env_steps, return), ...] (all of them if fewer)."""
    return sum(r for _, r in curve[-k:]) / len(curve[-k:]) if curve else float("nan")


def auc(curve: list) -> float:
    """Area under the return curve (trapezoid rule over env steps) divided by the steps it spans: the
    time-averaged return between the first and the last evaluation (the return itself for one point)."""
    if len(curve) < 2:
        return float(curve[0][1]) if curve else float("nan")
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:]))
    return area / (curve[-1][0] - curve[0][0])


def relative_score(value: float, reference: float) -> float | None:
    """1 + (value - reference) / |reference|: value / reference when the reference is positive; for
    negative returns a shortfall of the same relative size scores the same (-200 vs -150 -> 0.67,
    -100 vs -150 -> 1.33). None when the reference is 0."""
    return None if reference == 0 else 1 + (value - reference) / abs(reference)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True


def run_cached(job: dict) -> dict | None:
    """run_one, unless this exact job already finished (its JSON is in --out/runs/) or another
    live invocation is running it (its .running claim holds a live pid): then None."""
    path = job_path(Path(job["out"]), job)
    if path.exists():
        return json.loads(path.read_text())
    if job.get("summary_only"):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = path.with_suffix(".running")
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            owner = int(claim.read_text() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner and _alive(owner):
            return None
        claim.unlink(missing_ok=True)  # a killed invocation's claim
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        res = run_one(job)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, path)
    finally:
        claim.unlink(missing_ok=True)
    return res


def s2r_config(job: dict):
    """The TrainConfig of an s2r method's job: the task's recipe at the job's budget, with its --variant settings."""
    from s2r.policies.recipes import recipe

    task, steps = job["task"], job["steps"]
    algo, _, head = job["method"].partition("+")
    over = dict(CPU_PARALLEL.get(task, {}))
    for key, v in (job.get("overrides") or {}).items():  # --variant settings
        if key.startswith("agent."):
            over["agent"] = {**over.get("agent", {}), key[len("agent."):]: v}
        else:
            over[key] = v
    cfg = recipe(task, algo, head or "gaussian", total_steps=steps, seed=job["seed"], progress=False,
                 eval_every=max(steps // 10, 1), checkpoint_every=10**12, eval_episodes=5,
                 learning_starts=min(5000, steps // 10), threads=1, **over)
    for key, v in over.items():  # recipe() reads None as "not given"; a variant's null means None (no cap)
        if v is None and hasattr(cfg, key):
            setattr(cfg, key, v)
    cfg.reward_scale = job["scale"]  # learning sees scaled rewards; evaluation reports raw returns
    return cfg


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    task, method, seed, steps, scale = job["task"], job["method"], job["seed"], job["steps"], job["scale"]
    every = max(steps // 10, 1)
    t0 = time.perf_counter()
    curve = []
    if method in SB3_METHODS:
        import gymnasium as gym
        from stable_baselines3 import SAC
        from stable_baselines3.common.callbacks import BaseCallback

        import s2r.sim.gym  # noqa: F401  (registers the s2r/... gymnasium ids)

        gym_id = SB3_IDS.get(task, task)
        env = gym.make(gym_id)
        if scale != 1.0:  # evaluation (_eval_sb3) uses a fresh, unscaled env
            env = gym.wrappers.TransformReward(env, lambda r: r * scale)
        model = SAC("MlpPolicy", env, seed=seed, device="cpu", verbose=0,
                    learning_starts=min(5000, steps // 10), n_steps=SB3_METHODS[method])

        class Eval(BaseCallback):
            def _on_step(self):
                if self.num_timesteps % every == 0:
                    curve.append((self.num_timesteps, sb3_eval_return(self.model, gym_id, 5, 10_000 + seed)))
                return True

        model.learn(total_timesteps=steps, callback=Eval())
        env.close()
    else:
        from s2r.policies.trainer import Trainer

        cfg = s2r_config(job)
        with tempfile.TemporaryDirectory() as d:
            tr = Trainer(cfg, d)
            tr.train()
            curve = [(h["env_steps"], h["return_mean"]) for h in tr.eval_history]
    curve = [c for i, c in enumerate(curve) if i == 0 or c[0] != curve[i - 1][0]]  # one point per step count
    return {**job, "curve": curve, "final": curve[-1][1] if curve else float("nan"),
            "wall_s": time.perf_counter() - t0}


def label(r: dict) -> str:
    """method, or method@variant for a --variant run."""
    return f"{r['method']}@{r['variant']}" if r.get("variant") else r["method"]


def scores(runs: list[dict]) -> dict:
    """final / last5 / auc of each run, as mean +- std over the runs and per seed (in seed order)."""
    import numpy as np

    runs = sorted(runs, key=lambda r: r["seed"])
    out: dict = {"n": len(runs), "seeds": [r["seed"] for r in runs]}
    for name, fn in (("final", lambda c: c[-1][1] if c else float("nan")), ("last5", last_k_mean), ("auc", auc)):
        v = [float(fn(r["curve"])) for r in runs]
        out[name] = {"mean": round(float(np.mean(v)), 1), "std": round(float(np.std(v)), 1),
                     "per_seed": [round(x, 1) for x in v]}
    return out


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="<= 60 s: Pendulum-v1, 2 methods, 1 seed, 3k steps")
    p.add_argument("--tasks", default="Hopper-v5,HalfCheetah-v5")
    p.add_argument("--methods", default="sac,dsac-t,sac+pmoe,dsac-t+pmoe,sb3-sac")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--reward-scales", default="1", help="e.g. 0.1,1,10 (applied to --scale-methods)")
    p.add_argument("--scale-methods", default="dsac-t", help="methods rerun at each reward scale != 1")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="out/bench_learning")
    p.add_argument("--summary-only", action="store_true", help="summarise the stored runs; train nothing")
    p.add_argument("--reverse", action="store_true",
                   help="take the jobs last-first (a second invocation sharing --out meets the first halfway)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:key=value,agent.key=value: also run the s2r methods with these settings (repeatable)")
    p.add_argument("--variants-only", action="store_true",
                   help="run only the --variant jobs (the base methods' runs are recorded elsewhere)")
    a = p.parse_args()
    variants = [parse_variant(v) for v in a.variant]
    if a.quick:
        a.tasks, a.methods, a.seeds, a.steps, a.reward_scales = "Pendulum-v1", "sac,sb3-sac", "0", 3000, "1"
    tasks = [t for t in a.tasks.split(",") if t]
    methods = [m for m in a.methods.split(",") if m]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    scales = [float(s) for s in a.reward_scales.split(",") if s]
    scale_methods = [m for m in a.scale_methods.split(",") if m]
    if a.variants_only and not variants:
        p.error("--variants-only needs at least one --variant")
    base = not a.variants_only
    s2r_methods = [m for m in methods if m not in SB3_METHODS]  # --variant settings are s2r settings
    s2r_scale_methods = [m for m in scale_methods if m not in SB3_METHODS]
    jobs = [dict(task=t, method=m, seed=s, steps=a.steps, scale=1.0)
            for t in tasks for m in methods for s in seeds if base]
    jobs += [dict(task=t, method=m, seed=s, steps=a.steps, scale=1.0, variant=name, overrides=over)
             for name, over in variants for t in tasks for m in s2r_methods for s in seeds]
    jobs += [dict(task=t, method=m, seed=s, steps=a.steps, scale=c) for c in scales if c != 1.0
             for t in tasks for m in scale_methods for s in seeds if base]
    jobs += [dict(task=t, method=m, seed=s, steps=a.steps, scale=c, variant=name, overrides=over)  # variants too
             for name, over in variants for c in scales if c != 1.0
             for t in tasks for m in s2r_scale_methods for s in seeds]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out if not a.quick else Path(tempfile.mkdtemp(prefix="s2r_learning_quick_"))  # quick: never cached
    for j in jobs:
        j["out"], j["summary_only"] = str(runs_dir), a.summary_only
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.workers) as ex:
        results = list(ex.map(run_cached, jobs[::-1] if a.reverse else jobs))
    pending = sum(r is None for r in results)
    results = [r for r in results if r is not None]
    import numpy as np

    summary: dict = {"bench": "learning", "quick": a.quick, "steps": a.steps, "seeds": seeds,
                     "variants": {name: over for name, over in variants}, "results": {}}
    labels = methods + [f"{m}@{name}" for name, _ in variants for m in s2r_methods]
    scale_labels = scale_methods + [f"{m}@{name}" for name, _ in variants for m in s2r_scale_methods]
    for t in tasks:
        for lab in labels:
            runs = [r for r in results if r["task"] == t and label(r) == lab and r["scale"] == 1.0]
            if runs:
                summary["results"][f"{t}/{lab}"] = scores(runs)
        for c in scales:
            if c == 1.0:
                continue
            for m in scale_labels:
                if not any(r["task"] == t and label(r) == m and r["scale"] == c for r in results):
                    continue
                runs_1 = [r for r in results if r["task"] == t and label(r) == m and r["scale"] == 1.0]
                runs_c = [r for r in results if r["task"] == t and label(r) == m and r["scale"] == c]
                summary["results"][f"{t}/{m}@reward_x{c:g}"] = scores(runs_c)
                f1, fc = np.mean([r["final"] for r in runs_1]), np.mean([r["final"] for r in runs_c])
                summary["results"][f"{t}/{m}/reward_x{c:g}_relative"] = round(float(fc / f1), 3) if f1 else None
                l1 = np.mean([last_k_mean(r["curve"]) for r in runs_1])  # item 2's score, steadier than final
                lc = np.mean([last_k_mean(r["curve"]) for r in runs_c])
                summary["results"][f"{t}/{m}/reward_x{c:g}_relative_last5"] = round(float(lc / l1), 3) if l1 else None
    ratios = [relative_score(summary["results"][f"{t}/sac"]["last5"]["mean"],
                             summary["results"][f"{t}/sb3-sac"]["last5"]["mean"])
              for t in tasks if f"{t}/sac" in summary["results"] and f"{t}/sb3-sac" in summary["results"]]
    ratios = [r for r in ratios if r is not None]
    if a.quick or ratios:
        summary["sac_vs_sb3_last5"] = round(min(ratios), 3) if ratios else None
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary["pending_runs"] = pending  # run by another invocation: rerun this one afterwards to summarise all
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    os.replace(tmp, out / "results.json")
    _plot(results, tasks, labels, out / "curves.png")
    return summary


def _plot(results, tasks, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for m in methods:
            curves = [r["curve"] for r in results if r["task"] == t and label(r) == m and r["scale"] == 1.0]
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            x = np.array([s for s, _ in curves[0][:n]])
            y = np.array([[v for _, v in c[:n]] for c in curves])
            ax.plot(x, y.mean(0), label=m)
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2)
        ax.set_title(t)
        ax.set_xlabel("env steps")
        ax.set_ylabel("eval return")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(print(json.dumps(main())))

"""Correction benchmark: a weak arm policy finetuned with a scripted operator's corrections.

    python bench/hil.py [--quick] [--start RUN | --task arm-pick|arm-reach] [--minutes 60]
                        [--methods hil,no-intervention,hg-dagger] [--env-override KEY=VALUE ...]

1. Start: a trained arm-pick or arm-reach run (--start), or, without one, a short SAC pretraining on
   --task written to OUT/pretrain (its eval curve is reported: the start must be below 50 % success).
   --env-override shifts the robot of every session (weaker motors, latency, ...): the policy was
   trained on one robot and is corrected on another.
2. The same interaction budget (simulated minutes, summed over the parallel envs) for each method
   of s2r/hil_session.py, from the same start and seeds:
     hil              RLPD with the operator's corrections (the method)
     no-intervention  the same learner without an operator
     hg-dagger        behaviour cloning on the same operator's corrections
   Each session starts with --demos teleoperated episodes (HIL-SERL starts with about 20), counted in
   the budget: demonstration buffer for hil and hg-dagger, online buffer for no-intervention.
   The operator is sim/operator.py's scripted one (reaction delay 200-300 ms, stick noise) acting
   through control/operator.py's Arbiter, the code the ROS node runs.
   stable-baselines3 SAC does not apply: it cannot start from an s2r actor, and a from-scratch SB3
   run is not "the same start".
3. Every `--eval-every` simulated minutes: success rate of the deterministic policy without an
   operator (fresh episodes), and the share of ticks the operator acted since the last row.

Writes OUT/hil.json and OUT/hil_curves.png; the last stdout line is one JSON object with
success_start, success_end, intervention_rate_end (the hil method) and every method's end point.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def pretrain(out: Path, task: str, steps: int, num_envs: int, seed: int) -> tuple[Path, list[dict]]:
    from s2r.policies.recipes import recipe
    from s2r.policies.trainer import Trainer

    cfg = recipe(task, "sac", "gaussian", num_envs=num_envs, total_steps=steps, batch_size=256,
                 learning_starts=min(steps // 2, 50_000), updates_per_step=2.0, eval_every=max(steps // 4, 1),
                 checkpoint_every=steps, eval_episodes=16, seed=seed, progress=False)
    run = out / "pretrain"
    Trainer(cfg, run).train()
    import csv

    with open(run / "eval.csv") as f:
        hist = [{"env_steps": int(r["env_steps"]), "success": float(r["success_rate"]),
                 "return": float(r["return_mean"])} for r in csv.DictReader(f)]
    return run, hist


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, (m, r) in enumerate(results.items()):  # one colour per method in both panels
        x = [row["minutes"] for row in r["curve"]]
        a1.plot(x, [row["success"] for row in r["curve"]], marker="o", label=m, color=f"C{k}")
        if m != "no-intervention":
            a2.plot(x[1:], [row["intervention_rate"] for row in r["curve"][1:]], marker="o", label=m, color=f"C{k}")
    a1.set_xlabel("simulated interaction (min)")
    a1.set_ylabel("success (deterministic, no operator)")
    a1.set_ylim(-0.02, 1.02)
    a2.set_xlabel("simulated interaction (min)")
    a2.set_ylabel("intervention rate")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a reduced setting, at most ~60 s")
    p.add_argument("--start", type=Path, help="trained arm run to start from (default: pretrain one on --task)")
    p.add_argument("--task", default="arm-pick", choices=("arm-pick", "arm-reach"), help="task to pretrain on")
    p.add_argument("--env-override", action="append", default=[], metavar="KEY=VALUE",
                   help="shift the robot of every session, e.g. randomization.motor_strength=0.7 (repeatable)")
    p.add_argument("--pretrain-steps", type=int, default=200_000)
    p.add_argument("--minutes", type=float, default=60.0, help="simulated interaction per method")
    p.add_argument("--eval-every", type=float, default=5.0, help="simulated minutes between evaluations")
    p.add_argument("--envs", type=int, default=8)
    p.add_argument("--eval-episodes", type=int, default=16)
    p.add_argument("--utd", type=float, default=0.25, help="gradient updates per transition")
    # 5: 0.94 at 60 simulated minutes on arm-pick against 0.44 at 30 for weight 1 (docs/BENCHMARKS.md)
    p.add_argument("--bc-weight", type=float, default=5.0,
                   help="Q-filtered BC weight in hil's actor loss (0: pure RLPD)")
    p.add_argument("--demos", type=int, default=16, help="teleoperated demonstration episodes first (counted)")
    p.add_argument("--methods", default="hil,no-intervention,hg-dagger")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("out/bench_hil"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from s2r.bench_util import machine_info
    from s2r.hil_session import METHODS, SessionConfig, run_session
    from s2r.policies.hil import HILConfig

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    if args.quick:
        args.minutes, args.eval_every, args.envs, args.eval_episodes = 0.5, 0.25, 4, 4
        args.pretrain_steps, args.demos = 1_000, 0
        methods = ["hil", "no-intervention"]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pre_curve = None
    start = args.start
    if start is None:
        start, pre_curve = pretrain(args.out, args.task, args.pretrain_steps, 8 if not args.quick else 4, args.seed)
        print(f"pretrained {start}: {pre_curve}", flush=True)
    from s2r.policies.evaluate import load_run
    from s2r.sim.overrides import parse_env_overrides

    task = load_run(start)[0].task
    try:
        overrides = parse_env_overrides(args.env_override, task)
    except ValueError as e:
        p.error(str(e))
    results = {}
    for m in methods:
        cfg = SessionConfig(method=m, minutes=args.minutes, num_envs=args.envs, eval_every_min=args.eval_every,
                            eval_episodes=args.eval_episodes, seed=args.seed, demo_episodes=args.demos,
                            hil=HILConfig(utd=args.utd, seed=args.seed, critic_warmup=50 if args.quick else 500,
                                          bc_weight=args.bc_weight), env_overrides=overrides)
        r = run_session(start, cfg, progress=lambda row, m=m: print(f"{m}: {json.dumps(row)}", flush=True))
        results[m] = {"curve": r["curve"], "takeovers": r["takeovers"], "wall_s": r["wall_s"]}
    shifted = f" ({', '.join(args.env_override)})" if args.env_override else ""
    plot(results, args.out / "hil_curves.png", f"{task}{shifted}: corrections from a scripted operator")
    hil = results.get("hil")
    summary = {
        "bench": "hil", "quick": args.quick, "task": task, "env_overrides": overrides, "start": str(start),
        "minutes": args.minutes, "envs": args.envs, "utd": args.utd, "demo_episodes": args.demos,
        "bc_weight": args.bc_weight, "eval_episodes": args.eval_episodes,
        "pretrain_curve": pre_curve,
        **({"success_start": hil["curve"][0]["success"], "success_end": hil["curve"][-1]["success"],
            "intervention_rate_end": hil["curve"][-1]["intervention_rate"],
            "takeovers": hil["takeovers"]} if hil else {}),
        "end": {m: {"success": r["curve"][-1]["success"], "intervention_rate": r["curve"][-1]["intervention_rate"],
                    "wall_s": round(r["wall_s"], 1)} for m, r in results.items()},
        "curves": {m: r["curve"] for m, r in results.items()},
        "wall_s": round(time.perf_counter() - t0, 1), "machine": machine_info(),
    }
    if hil and len(results) > 1:  # at every evaluation after the start, strictly better than each baseline
        rows = range(1, len(hil["curve"]))
        summary["hil_better_at_every_budget"] = all(
            hil["curve"][i]["success"] > r["curve"][i]["success"] for m, r in results.items() if m != "hil"
            for i in rows)
    (args.out / "hil.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""World-model fidelity benchmark: the EDM diffusion model vs an MBPO/MOPO probabilistic ensemble, one run.

    python bench/world_model.py [--quick] [--threads N]

Per task (humanoid-stand with policies/pretrained/g1_stand.onnx, arm-reach with panda_reach.onnx), both
models are trained on the same rollouts (the shipped policy plus Gaussian action noise, std drawn per env
in --noise) and measured on held-out rollouts from another seed:
  1. one-step error and open-loop H-step error, H = 1..50 (errors in stds of each state dim; predicted
     states are clamped to the training data's range for both models, as in imagination);
     the ensemble both as MBPO imagines (random elite, a Gaussian draw) and as its elites' mean, the
     diffusion model both as it imagines (one sample per step) and as the mean of 8 samples per step;
  2. failure agreement: from held-out states, open-loop for 25 steps with the real actions; does the
     model (termination or leaving the safe set) predict the falls the rollouts show?
  3. uncertainty-error correlation (Spearman; diffusion: spread of 8 samples; ensemble: MOPO max std);
  4. imagined-vs-real return of fixed policies (the shipped policy, deterministic and with action noise std
     0.3): rollouts of each policy held out; from their states the policy acts on each model's predictions
     for H_ret steps (closed loop, as in imagination); relative gap of the mean returns and their correlation;
  5. imagined transitions/s at batch 4096 with 3 Euler steps, against the measured matmul ceiling: the
     same denoiser's matmuls at the same shapes as a raw torch.mm chain.
Last line: one JSON object (h10_error_ratio_vs_ensemble: diffusion H=10 error, one sample per step, / the
better ensemble mode's, humanoid-stand; h10_error_ratio_best_modes: the better diffusion mode's / the better
ensemble mode's; ..._arm: the same for arm-reach; imagined_per_s; ...).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from s2r.bench_util import imagined_speed, machine_info
from s2r.control.spec import RobotSpec  # noqa: F401
from s2r.world_models.data import collect_rollouts, load_actor
from s2r.world_models.diffusion import DiffusionWorldModel, WorldModelConfig
from s2r.world_models.ensemble import EnsembleConfig, ProbabilisticEnsemble, train_ensemble
from s2r.world_models.imagined_env import ImaginedEnv, ImaginedEnvConfig
from s2r.world_models.train import (FitConfig, diffusion_stepper, diffusion_uncertainty, failure_agreement,
                                    horizon_errors, one_step_error, return_gap, train_diffusion,
                                    uncertainty_calibration)

ROOT = Path(__file__).resolve().parents[1]
TASKS = (("humanoid-stand", "policies/pretrained/g1_stand.onnx"), ("arm-reach", "policies/pretrained/panda_reach.onnx"))


def settings(quick: bool) -> dict:
    if quick:
        return dict(envs=12, steps=120, held_envs=6, held_steps=100, width=128, blocks=2, fit_steps=300,
                    ens_steps=300, H=20, batch=256, H_ret=10, ret_envs=4, ret_steps=60)
    return dict(envs=32, steps=400, held_envs=16, held_steps=250, width=256, blocks=4, fit_steps=2500,
                ens_steps=2500, H=50, batch=256, H_ret=25, ret_envs=16, ret_steps=250)


def bench_task(task: str, policy: str, s: dict, noise: tuple[float, float], seed: int = 0) -> dict:
    from s2r.sim.tasks import make_task

    spec = make_task(task).spec
    act = load_actor(ROOT / policy, spec)
    t0 = time.perf_counter()
    train = collect_rollouts(task, act, s["envs"], s["steps"], noise, seed)
    held = collect_rollouts(task, act, s["held_envs"], s["held_steps"], noise, seed + 1000)
    t_data = time.perf_counter() - t0
    k = 2
    torch.manual_seed(seed)
    dm = DiffusionWorldModel(WorldModelConfig(train.state.shape[1], train.action.shape[1], history=k,
                                              width=s["width"], blocks=s["blocks"]))
    t0 = time.perf_counter()
    hist = train_diffusion(dm, train, FitConfig(s["fit_steps"], s["batch"], 1e-3, seed=seed))
    t_dm = time.perf_counter() - t0
    ens = ProbabilisticEnsemble(EnsembleConfig(train.state.shape[1], train.action.shape[1], history=k))
    t0 = time.perf_counter()
    train_ensemble(ens, train, steps=s["ens_steps"], batch_size=s["batch"], seed=seed)
    t_ens = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    steppers = {"diffusion": diffusion_stepper(dm, 3, "euler", g),
                "diffusion_mean": diffusion_stepper(dm, 3, "euler", g, mean_of=8),
                "ensemble_sample": lambda st, a: ens.predict(st, a, sample=True, generator=g)[:3],
                "ensemble_mean": lambda st, a: ens.predict(st, a, sample=False)[:3]}
    clamp = (dm.state_lo, dm.state_hi)  # the same (training data's) range for every model
    out: dict = {"task": task, "policy": policy, "train_transitions": len(train), "held_transitions": len(held),
                 "held_real_falls_steps": int(held.terminated.sum()), "data_s": round(t_data, 1),
                 "diffusion_fit_s": round(t_dm, 1), "ensemble_fit_s": round(t_ens, 1),
                 "diffusion_final_loss": hist[-1][1]}
    fallen = (ImaginedEnv(dm, held, 1, ImaginedEnvConfig(), spec=spec).fallen
              if held.layout and "critic.base_height" in held.layout else None)
    curves = {}
    for name, step in steppers.items():
        curves[name] = horizon_errors(step, held, k, s["H"], clamp=clamp)
        out[name] = {"one_step_error": one_step_error(step, held, k)["one_step_error"],
                     "h_error": {str(h): round(float(curves[name][h - 1]), 4) for h in (1, 5, 10, 20, 50)
                                 if h <= s["H"]},
                     "failures": failure_agreement(step, held, k, fallen=fallen)}
    out["diffusion"].update(uncertainty_calibration(diffusion_uncertainty(dm, 8, 3, "euler", g), held, k))
    out["ensemble_sample"].update(uncertainty_calibration(
        lambda st, a: (lambda r: (r[3], r[0]))(ens.predict(st, a, sample=True, generator=g)), held, k))
    best_ens = min(float(curves["ensemble_sample"][9]), float(curves["ensemble_mean"][9]))
    out["h10_error_ratio_vs_ensemble"] = float(curves["diffusion"][9]) / best_ens
    # each model's better mode (one sample or the mean of 8; a draw or the elites' mean)
    best_dm = min(float(curves["diffusion"][9]), float(curves["diffusion_mean"][9]))
    out["h10_error_ratio_best_modes"] = best_dm / best_ens
    sigma, gn = 0.3, torch.Generator().manual_seed(seed + 5)
    fixed = {"deterministic": (act, (0.0, 0.0)),
             f"noise_{sigma}": (lambda o: (act(o) + sigma * torch.randn(o.shape[0], spec.action_dim,
                                                                      generator=gn)).clamp(-1, 1), (sigma, sigma))}
    out["return_gap"] = {}
    for pname, (pol, pnoise) in fixed.items():
        real = collect_rollouts(task, act, s["ret_envs"], s["ret_steps"], pnoise, seed + 2000)
        out["return_gap"][pname] = {name: return_gap(step, pol, real, k, s["H_ret"], clamp=clamp, fallen=fallen)
                                    for name, step in steppers.items()}
    out["curves"] = {n: [round(float(v), 4) for v in c] for n, c in curves.items()}
    out["_model"] = dm
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data and models (<= 60 s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--noise", default="0.0,1.0", help="action-noise std range of the rollouts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    s = settings(args.quick)
    noise = tuple(float(v) for v in args.noise.split(","))
    results = [bench_task(t, p, s, noise) for t, p in TASKS]
    speed = imagined_speed(results[0]["_model"], seconds=1.0 if args.quick else 3.0)
    for r in results:
        r.pop("_model")
        print(f"\n== {r['task']} ({r['train_transitions']} train / {r['held_transitions']} held-out transitions, "
              f"{r['held_real_falls_steps']} falls held out) ==")
        print(f"{'model':16s} {'1-step':>8s} " + " ".join(f"{'H=' + h:>8s}" for h in r["diffusion"]["h_error"])
              + f" {'falls real/pred/missed':>24s} {'false alarms':>12s}")
        for name in ("diffusion", "diffusion_mean", "ensemble_sample", "ensemble_mean"):
            m, f = r[name], r[name]["failures"]
            print(f"{name:16s} {m['one_step_error']:8.4f} " + " ".join(f"{v:8.4f}" for v in m["h_error"].values())
                  + f" {f['real_falls']:>10d}/{f['predicted_falls']}/{f['missed_falls']:<10d}"
                  + f" {f['false_alarm_rate']:12.3f}")
        print(f"u-error Spearman: diffusion {r['diffusion']['u_error_spearman']:.3f}, "
              f"ensemble (MOPO) {r['ensemble_sample']['u_error_spearman']:.3f}; "
              f"H=10 error ratio diffusion/ensemble {r['h10_error_ratio_vs_ensemble']:.3f}, "
              f"better mode of each {r['h10_error_ratio_best_modes']:.3f}")
        for pname, per in r["return_gap"].items():
            g0 = next(iter(per.values()))
            print(f"return over {g0['horizon']} steps, policy {pname} ({g0['windows']} windows, real mean "
                  f"{g0['real_return_mean']:.2f}, real falls {g0['real_fall_share']:.2f}): " + "; ".join(
                      f"{n} gap {g['relative_gap']:+.3f} r={g['return_pearson']:.2f} falls {g['imagined_fall_share']:.2f}"
                      for n, g in per.items()))
    print(f"\nimagined transitions/s at batch {speed['batch']}, {speed['sampling_steps']} Euler steps "
          f"({speed['network']}): {speed['imagined_per_s']:.0f}; matmul ceiling {speed['matmul_ceiling_per_s']:.0f} "
          f"({speed['matmul_gflops']:.1f} GFLOP/s) -> {100 * speed['share_of_ceiling']:.0f} %")
    summary = {"bench": "world_model", "quick": args.quick, "threads": args.threads, "machine": machine_info(),
               "h10_error_ratio_vs_ensemble": results[0]["h10_error_ratio_vs_ensemble"],
               "h10_error_ratio_vs_ensemble_arm": results[1]["h10_error_ratio_vs_ensemble"],
               "h10_error_ratio_best_modes": results[0]["h10_error_ratio_best_modes"],
               "h10_error_ratio_best_modes_arm": results[1]["h10_error_ratio_best_modes"],
               "return_gap_diffusion": results[0]["return_gap"]["deterministic"]["diffusion"]["relative_gap"],
               "imagined_per_s": speed["imagined_per_s"], "matmul_ceiling_per_s": speed["matmul_ceiling_per_s"],
               "share_of_matmul_ceiling": speed["share_of_ceiling"],
               "tasks": {r["task"]: {k: v for k, v in r.items() if k != "curves"} for r in results},
               "curves": {r["task"]: r["curves"] for r in results},
               "wall_s": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

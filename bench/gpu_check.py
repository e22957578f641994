"""GPU check: one run, on one data-centre GPU (H100/H200), of what s2r's GPU path promises, in <= 8 minutes.

    python bench/gpu_check.py [--device cuda] [--out out/gpu_check] [--sections parity,throughput,updates,imagine,train]
                              [--train-seconds 150] [--budget-s 480] [--quick] [--dry-run]

Sections (each on its own: an error is recorded in the JSON under its section and the others go on):
  parity      MuJoCo Warp (the `warp` backend, its CUDA graph capture on) against the C engine (`mujoco`,
              float64) on humanoid-walk and arm-pick: 50 control steps of the same random actions from the
              same state, free-running and one step at a time (sim/parity.py). The verdict is on the one-step
              run (each step starts from the C engine's state): it bounds the per-step model error, where a
              free-running humanoid's feet may change contact one step apart and part the trajectories
              without anything being wrong (tests/test_warp_backend.py). Tolerances: PARITY_TOL.
  throughput  humanoid-walk env steps/s through BatchedEnv.step (random actions, nominal model) at 1024, 4096
              and 8192 worlds: Warp on the device against the `mujoco` CPU backend (MuJoCo threads on all
              cores) at the same env counts (s2r/bench_sim.py). Physics steps/s = env steps/s x decimation.
  updates     learner gradient updates/s at batch 8192 with the humanoid-walk recipe's networks: float32,
              bf16 autocast, and bf16 autocast + torch.compile (the recipe's settings with compile on)
              (s2r/bench_util.py: updates_per_s; the learner alone, one fixed batch).
  imagine     the diffusion world model's imagined transitions/s (3 Euler steps; the network of
              bench/world_model.py: width 256, 4 blocks, history 2, humanoid-stand's state and action sizes)
              at batch 4096 and 65536, against the same denoiser's matmuls as a raw torch.mm chain on the
              device (s2r/bench_util.py: imagined_speed; float32, TF32 off).
  train       the humanoid-walk GPU recipe (policies/recipes.py; its sim on Warp on the device) for a fixed
              wall-clock budget, evaluated ~6 times (the return curve over time); the final checkpoint exported
              to ONNX (policies/export.py, verified against torch) and run through onnxruntime for 10 s of
              simulated time on the CPU simulator (`mujoco` backend): did it stay up, and its return.
              The budget is --train-seconds, cut so that the whole script ends within --budget-s.

Writes OUT/gpu_check.json and OUT/gpu_check.md (one table); the last stdout line is the JSON. Exit code 1
when a section failed (an error, or parity out of tolerance). Without a CUDA device it stops at once
unless --dry-run (or --device cpu) is given.
--dry-run: the same code path end to end on the CPU (Warp's CPU device) at tiny sizes (SMALL), so the script
cannot rot: tests/test_gpu_check.py runs it. --quick: those tiny sizes on --device (<= 60 s once Warp's
kernels are compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from s2r.bench_sim import s2r_physics_steps_per_s
from s2r.bench_util import machine_info, updates_per_s
from s2r.io import atomic_write_text

SECTIONS = ("parity", "throughput", "updates", "imagine", "train")
TASK = "humanoid-walk"  # throughput, updates and training
PARITY_TASKS = ("humanoid-walk", "arm-pick")
# One-step parity tolerances, (qpos, qvel): max |warp - C| in m or rad, m/s or rad/s. Measured on Warp's CPU
# device (warp-lang 1.19, mujoco-warp 4.0; 4 envs, seeds 0-3, 50 steps of random actions): humanoid-walk qpos
# 1.7e-6, qvel 3.2e-4; arm-pick qpos 1.4e-4 (the cube's height in the first step after the reset, while it
# settles on the table; 2e-6 by the 8th step), qvel 2.4e-4. Both engines run the same solver, Warp in
# float32: a GPU sums in another order, not with a larger round-off, so 6-8x those is the bound.
PARITY_TOL = {"humanoid-walk": (1e-5, 2e-3), "arm-pick": (1e-3, 2e-3)}
TRAIN_RESERVE_S = 45.0  # of the budget, kept for the final evaluation, the export and the ONNX run
NO_CUDA = "error: no CUDA device: run with --dry-run to check the script on the CPU"


@dataclass(frozen=True)
class Sizes:
    """How large each section runs: FULL on the GPU, SMALL for --dry-run / --quick."""

    parity_envs: int
    parity_steps: int  # control steps
    throughput_envs: tuple[int, ...]  # worlds
    throughput_seconds: float  # timed window per backend and env count
    batch: int  # updates section
    updates_seconds: float  # timed window per variant
    imagine_batches: tuple[int, ...]  # imagine section
    imagine_seconds: float  # timed window per batch, for the model and for its matmul ceiling
    train_seconds: float  # default --train-seconds
    evals: int  # evaluations within the training budget (plus the final one)
    onnx_seconds: float  # simulated seconds of the ONNX policy on the CPU simulator
    train_overrides: dict  # TrainConfig fields over the recipe's (beyond backend, device and the clock)


FULL = Sizes(parity_envs=16, parity_steps=50, throughput_envs=(1024, 4096, 8192), throughput_seconds=3.0,
             batch=8192, updates_seconds=5.0, imagine_batches=(4096, 65536), imagine_seconds=2.0,
             train_seconds=150.0, evals=6, onnx_seconds=10.0, train_overrides=dict(eval_episodes=8))
SMALL = Sizes(parity_envs=2, parity_steps=3, throughput_envs=(2, 4), throughput_seconds=0.5,
              batch=64, updates_seconds=0.5, imagine_batches=(64,), imagine_seconds=0.2,
              train_seconds=5.0, evals=2, onnx_seconds=1.0,
              train_overrides=dict(num_envs=4, batch_size=64, buffer_size=20_000, learning_starts=64,
                                   eval_episodes=2, env_overrides={"episode_length_s": 1.0}))


# ---- sections: each fills `res` as it goes, so an error keeps what was measured before it ---------------

def check_parity(res: dict, sz: Sizes, device: str) -> bool:
    from s2r.sim import BatchedEnv, EnvConfig
    from s2r.sim.parity import compare_envs

    ok = True
    for task in PARITY_TASKS:
        warp, ref = (BatchedEnv(EnvConfig(task=task, backend=b, device=d, num_envs=sz.parity_envs, seed=0,
                                          randomize=False)) for b, d in (("warp", device), ("mujoco", "cpu")))
        try:
            one = compare_envs(warp, ref, sz.parity_steps, seed=0, one_step=True)
            free = compare_envs(warp, ref, sz.parity_steps, seed=0)
            tol_q, tol_v = PARITY_TOL[task]
            passed = one.qpos <= tol_q and one.qvel <= tol_v and one.done_mismatch_step is None  # NaN fails
            res[task] = {"num_envs": sz.parity_envs, "control_steps": sz.parity_steps,
                         "physics_steps": sz.parity_steps * warp.decimation,
                         "graph_capture": warp.backend.use_graph,  # False: Warp could not capture, ran eagerly
                         "one_step": dataclasses.asdict(one), "free_running": dataclasses.asdict(free),
                         "tolerance_one_step": {"qpos": tol_q, "qvel": tol_v}, "pass": passed}
        finally:
            warp.close()
            ref.close()
        ok &= passed
        print(f"parity {task}: one step qpos {one.qpos:.2e} qvel {one.qvel:.2e} (tol {tol_q:g} / {tol_v:g}) "
              f"{'pass' if passed else 'FAIL'}; free-running qpos {free.qpos:.2e} qvel {free.qvel:.2e}", flush=True)
    res["pass"] = ok
    return ok


def check_throughput(res: dict, sz: Sizes, device: str) -> bool:
    rows = res.setdefault("rows", [])
    res["unit"] = "env steps/s (x decimation = physics steps/s)"
    for n in sz.throughput_envs:
        row: dict = {"num_envs": n}
        for key, backend, dev in (("warp", "warp", device), ("mujoco_cpu", "mujoco", "cpu")):
            pps, env = s2r_physics_steps_per_s(TASK, None, n, sz.throughput_seconds, backend=backend,
                                               device=dev, randomize=False)
            row["decimation"] = env.decimation
            row[f"{key}_env_steps_per_s"] = _sig(pps / env.decimation)
            row[f"{key}_physics_steps_per_s"] = _sig(pps)
            env.close()
            del env
            _free(device)
        row["warp_over_cpu"] = _sig(row["warp_env_steps_per_s"] / row["mujoco_cpu_env_steps_per_s"])
        rows.append(row)
        print(f"throughput {n} worlds: warp {row['warp_env_steps_per_s']:.4g} env steps/s, mujoco CPU "
              f"{row['mujoco_cpu_env_steps_per_s']:.4g} (x{row['warp_over_cpu']:.3g})", flush=True)
    return True


def check_updates(res: dict, sz: Sizes, device: str) -> bool:
    from s2r.policies.recipes import recipe
    from s2r.sim import BatchedEnv, EnvConfig

    probe = BatchedEnv(EnvConfig(task=TASK, num_envs=1))  # the observation and action sizes
    dims = (probe.obs_dim, probe.critic_obs_dim, probe.action_dim)
    probe.close()
    agent = recipe(TASK, "sac", device=device).agent
    res.update(batch=sz.batch, obs_dim=dims[0], critic_obs_dim=dims[1], action_dim=dims[2],
               actor_hidden=list(agent.actor_hidden), critic_hidden=list(agent.critic_hidden),
               float32_matmul_precision=torch.get_float32_matmul_precision())  # "highest": no TF32
    ok = True
    for name, bf16, compile_ in (("float32", False, False), ("bf16", True, False), ("bf16_compile", True, True)):
        cfg = dataclasses.replace(agent, bf16=bf16, compile=compile_)
        t0 = time.perf_counter()
        try:
            ups = updates_per_s(cfg, *dims, sz.batch, sz.updates_seconds, device=device)
            res[name] = {"updates_per_s": _sig(ups), "wall_s": round(time.perf_counter() - t0, 1)}
            print(f"updates/s at batch {sz.batch}, {name}: {ups:.4g} ({res[name]['wall_s']} s with warm-up)",
                  flush=True)
        except Exception as e:  # e.g. torch.compile without a compiler: the other variants still count
            res[name] = {"error": _error(e)}
            ok = False
            print(f"updates {name}: {res[name]['error']}", flush=True)
        _free(device)
    return ok


def check_imagine(res: dict, sz: Sizes, device: str) -> bool:
    from s2r.bench_util import imagined_speed
    from s2r.sim import BatchedEnv, EnvConfig
    from s2r.world_models.diffusion import DiffusionWorldModel, WorldModelConfig

    probe = BatchedEnv(EnvConfig(task="humanoid-stand", num_envs=1))  # the state is the critic observation
    dims = (probe.critic_obs_dim, probe.action_dim)
    probe.close()
    torch.manual_seed(0)  # the speed does not depend on the weights: an untrained model of the benchmark's size
    dm = DiffusionWorldModel(WorldModelConfig(*dims, history=2, width=256, blocks=4))
    res.update(state_dim=dims[0], action_dim=dims[1], rows=[])
    for B in sz.imagine_batches:
        r = imagined_speed(dm, B=B, steps=3, seconds=sz.imagine_seconds, device=device)
        res["rows"].append({k: (_sig(v) if isinstance(v, float) else v) for k, v in r.items()})
        print(f"imagined transitions/s at batch {B}: {r['imagined_per_s']:.4g}, matmul ceiling "
              f"{r['matmul_ceiling_per_s']:.4g} ({100 * r['share_of_ceiling']:.0f} %, "
              f"{r['matmul_gflops']:.4g} GFLOP/s)", flush=True)
    return True


def check_training(res: dict, sz: Sizes, device: str, train_seconds: float, workdir: Path) -> bool:
    from s2r.policies.evaluate import evaluate_policy
    from s2r.policies.export import export_onnx
    from s2r.policies.recipes import recipe
    from s2r.policies.trainer import Trainer, make_env_for
    from s2r.world_models.data import onnx_actor

    big = 10**12  # the wall clock stops training, not a step count
    cfg = recipe(TASK, "sac", backend="warp", device=device, total_steps=big, eval_every=big, checkpoint_every=big,
                 eval_every_s=train_seconds / sz.evals, max_wall_s=train_seconds, progress=False,
                 threads=torch.get_num_threads(), **sz.train_overrides)
    res["config"] = {k: getattr(cfg, k) for k in ("backend", "device", "num_envs", "batch_size", "updates_per_step",
                                                  "buffer_size", "learning_starts", "n_step", "eval_episodes",
                                                  "max_wall_s", "eval_every_s")}
    res["config"]["bf16"] = cfg.agent.bf16
    run = workdir / "run"
    tr = Trainer(cfg, run)
    t0 = time.perf_counter()
    tr.train()
    wall = time.perf_counter() - t0
    res.update(wall_s=round(wall, 1), env_steps=tr.env_steps, updates=tr.n_updates,
               env_steps_per_s=_sig(tr.env_steps / wall), updates_per_s=_sig(tr.n_updates / wall))
    res["return_curve"] = [{"wall_s": round(e["wall_s"], 1), "env_steps": e["env_steps"],
                            "return_mean": round(e["return_mean"], 3), "length_mean": e["length_mean"],
                            "terminated_rate": e["terminated_rate"]} for e in tr.eval_history]
    print(f"training: {tr.env_steps} env steps, {tr.n_updates} updates in {wall:.0f} s; eval returns "
          + ", ".join(f"{e['wall_s']:.0f}s:{e['return_mean']:.1f}" for e in res["return_curve"]), flush=True)
    _free(device)

    onnx_path = workdir / "policy.onnx"
    report = export_onnx(run, onnx_path)
    res["export"] = {k: report[k] for k in ("max_abs_err_random", "tolerance", "content_sha256", "opset")}
    res["export"]["onnx_bytes"] = report["sizes"]["onnx_bytes"]
    # the robot's runtime (onnxruntime, batch 1) on the C engine, one env, one episode of onnx_seconds
    over = {**cfg.env_overrides, "episode_length_s": sz.onnx_seconds}
    env = make_env_for(dataclasses.replace(cfg, backend="mujoco", device="cpu", env_overrides=over), 1, seed=123,
                       eval_mode=True)
    try:
        out = evaluate_policy(env, onnx_actor(onnx_path, env.spec), seed=123)
        sim_s = out["length_mean"] * env.control_dt
    finally:
        env.close()
    res["onnx_on_cpu_sim"] = {"sim_seconds": round(sim_s, 3), "asked_seconds": sz.onnx_seconds,
                              "return": round(out["return_mean"], 3), "stayed_up": out["terminated_rate"] == 0.0}
    print(f"ONNX policy on the CPU simulator: {sim_s:.2f} s simulated, return {out['return_mean']:.2f}, "
          f"{'stayed up' if out['terminated_rate'] == 0.0 else 'fell'}", flush=True)
    return True


# ---- helpers ------------------------------------------------------------------------------------------

def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def _free(device: str) -> None:
    """Drop the last section's simulator and networks before the next allocates (8192 worlds, 10M-row buffer)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def device_info(device: str) -> dict:
    info = machine_info()
    for pkg in ("warp-lang", "mujoco-warp", "onnxruntime"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    info["torch_cuda"] = torch.version.cuda
    dev = torch.device(device)
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info["gpu"] = p.name
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
    return info


def markdown(out: dict) -> str:
    """One table: a row per measurement, the machine and the verdicts in its header line."""
    m = out["machine"]
    where = m.get("gpu") or f"{m['cpu']} (CPU; Warp device cpu)"
    s = out["sections"]
    lines = [f"GPU check ({'dry run' if out['dry_run'] else 'quick' if out['quick'] else 'full'}), {where}, "
             f"torch {m['torch']}, warp-lang {m['warp-lang']}, mujoco-warp {m['mujoco-warp']}, "
             f"{out['wall_s']:.0f} s; failed: {', '.join(out['failed']) or 'none'}", "",
             "| section | measurement | result |", "|---|---|---|"]

    def row(a: str, b: str, c: str) -> None:
        lines.append(f"| {a} | {b} | {c} |")

    for name in out["sections_run"]:
        r = s[name]
        if name == "parity":
            for task in PARITY_TASKS:
                if task in r:
                    p = r[task]
                    one, free, tol = p["one_step"], p["free_running"], p["tolerance_one_step"]
                    row(f"parity {task}", f"max abs qpos / qvel, one step at a time, {p['control_steps']} steps x "
                        f"{p['num_envs']} envs (tolerance)", f"{one['qpos']:.2e} / {one['qvel']:.2e} "
                        f"({tol['qpos']:g} / {tol['qvel']:g}): {'pass' if p['pass'] else 'FAIL'}")
                    row(f"parity {task}", "max abs qpos / qvel, free-running (same actions, same start)",
                        f"{free['qpos']:.2e} / {free['qvel']:.2e}")
        elif name == "throughput":
            for t in r.get("rows", []):
                row(f"throughput {TASK}", f"env steps/s at {t['num_envs']} worlds: warp on {out['device']} / "
                    f"mujoco CPU", f"{t['warp_env_steps_per_s']:.4g} / {t['mujoco_cpu_env_steps_per_s']:.4g} "
                    f"(x{t['warp_over_cpu']:.3g})")
        elif name == "updates":
            for v in ("float32", "bf16", "bf16_compile"):
                if v in r:
                    row("learner", f"updates/s at batch {r['batch']}, {v}",
                        f"{r[v]['updates_per_s']:.4g}" if "updates_per_s" in r[v] else r[v]["error"])
        elif name == "imagine":
            for t in r.get("rows", []):
                row("world model", f"imagined transitions/s at batch {t['batch']}, 3 Euler steps ({t['network']}): "
                    f"model / matmul ceiling", f"{t['imagined_per_s']:.4g} / {t['matmul_ceiling_per_s']:.4g} "
                    f"({100 * t['share_of_ceiling']:.0f} %)")
        elif name == "train":
            if "return_curve" in r:
                row(f"training {TASK}", f"eval return over wall time ({r['env_steps']} env steps, "
                    f"{r['updates']} updates in {r['wall_s']} s)",
                    ", ".join(f"{e['wall_s']:.0f} s: {e['return_mean']:.1f}" for e in r["return_curve"]))
            if "onnx_on_cpu_sim" in r:
                o = r["onnx_on_cpu_sim"]
                row("ONNX policy", f"on the mujoco CPU simulator, {o['asked_seconds']:g} s asked",
                    f"{o['sim_seconds']:.2f} s simulated, return {o['return']:.2f}, "
                    f"{'stayed up' if o['stayed_up'] else 'fell'}")
        if "error" in r:
            row(name, "error", r["error"].replace("|", "/").replace("\n", " "))
    return "\n".join(lines) + "\n"


def main() -> int:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="torch and Warp device (cuda, cuda:N; cpu: slow)")
    p.add_argument("--out", default="out/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--train-seconds", type=float, default=None,
                   help=f"training wall-clock budget (default {FULL.train_seconds:g}; {SMALL.train_seconds:g} "
                        f"with --quick/--dry-run)")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole script's target; cuts the training")
    p.add_argument("--quick", action="store_true", help="tiny sizes on --device (<= 60 s)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Warp's CPU device)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU simulator uses all cores)")
    a = p.parse_args()
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        sys.exit(f"error: unknown --sections {unknown or a.sections!r}; choose from {','.join(SECTIONS)}")
    if a.train_seconds is not None and not a.train_seconds > 0:
        sys.exit(f"error: --train-seconds must be > 0, got {a.train_seconds:g}")
    device = "cpu" if a.dry_run else a.device
    try:
        dev = torch.device(device)
    except RuntimeError:
        sys.exit(f"error: unknown --device {device!r}: use cuda, cuda:N or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit(NO_CUDA)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        sys.exit(f"error: --device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cuda", "cpu"):
        sys.exit(f"error: --device {device!r}: use cuda, cuda:N or cpu")
    torch.set_num_threads(a.threads)
    sz = SMALL if a.dry_run or a.quick else FULL
    train_asked = a.train_seconds if a.train_seconds is not None else sz.train_seconds
    out_dir = Path(a.out)

    out: dict = {"bench": "gpu_check", "dry_run": a.dry_run, "quick": a.quick, "device": device,
                 "machine": device_info(device), "sizes": dataclasses.asdict(sz),
                 "sections_run": sections, "sections": {}}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in sections:
            res: dict = {}
            out["sections"][name] = res
            t0 = time.perf_counter()
            try:
                if name == "parity":
                    ok = check_parity(res, sz, device)
                elif name == "throughput":
                    ok = check_throughput(res, sz, device)
                elif name == "updates":
                    ok = check_updates(res, sz, device)
                elif name == "imagine":
                    ok = check_imagine(res, sz, device)
                else:
                    left = a.budget_s - (time.perf_counter() - t_start) - TRAIN_RESERVE_S
                    train_s = max(min(train_asked, left), min(train_asked, 20.0))
                    res["train_seconds_asked"], res["train_seconds"] = train_asked, round(train_s, 1)
                    ok = check_training(res, sz, device, train_s, Path(tmp))
            except Exception as e:  # this section's error goes into the JSON; the next section runs
                res["error"] = _error(e)
                traceback.print_exc()
                print(f"{name}: {res['error']}", flush=True)
                ok = False
            res["section_wall_s"] = round(time.perf_counter() - t0, 1)
            if not ok:
                failed.append(name)
            _free(device)
    out["failed"] = failed
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    atomic_write_text(out_dir / "gpu_check.md", markdown(out))
    out["files"] = [str(out_dir / "gpu_check.json"), str(out_dir / "gpu_check.md")]
    atomic_write_text(out_dir / "gpu_check.json", json.dumps(out, indent=1) + "\n")
    print(json.dumps(out), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

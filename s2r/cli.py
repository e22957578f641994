"""`s2r` command line. Subcommands are thin: they parse, call library code, print.

    s2r sim info humanoid-walk
    s2r sim play humanoid-walk --video out/walk.mp4
    s2r bench sim --quick
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="s2r: sim-to-real robot learning")
sim_app = typer.Typer(no_args_is_help=True, help="Simulated robots and tasks")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (also runnable as bench/*.py)")
app.add_typer(sim_app, name="sim")
app.add_typer(bench_app, name="bench")
ros_app = typer.Typer(no_args_is_help=True, help="ROS 2 deployment (needs the ros extra: pip install s2r[ros])")
app.add_typer(ros_app, name="ros")
data_app = typer.Typer(no_args_is_help=True, help="Recorded robot sessions (MCAP): inspect, export to a dataset")
app.add_typer(data_app, name="data")
from s2r.cli_wm import wm_app  # noqa: E402  (typer only at import: `s2r --help` stays fast)
app.add_typer(wm_app, name="wm")


def _fail(msg: str, code: int = 2) -> None:
    """One `error: ...` line on stderr (a multi-line message is joined), then exit `code`."""
    typer.secho("error: " + " ".join(str(msg).split()), fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _note(msg: str) -> None:
    typer.secho(f"note: {msg}", fg=typer.colors.YELLOW, err=True)


def _set_threads(n: Optional[int]) -> None:
    import torch

    torch.set_num_threads(n or 1)  # env math is tiny; physics threads are MuJoCo's own


def _make_env(task: str, num_envs: int, backend: str, spec: Optional[str], seed: int,
              randomize: Optional[bool] = None, device: str = "cpu"):
    from s2r.control.spec import SpecError
    from s2r.sim import BatchedEnv, EnvConfig, EnvError
    from s2r.sim.model import ModelError
    from s2r.sim.tasks import UnknownTaskError

    try:
        return BatchedEnv(EnvConfig(task=task, num_envs=num_envs, backend=backend, spec=spec, seed=seed,
                                    randomize=randomize, device=device))
    except (SpecError, EnvError, ModelError, UnknownTaskError, ValueError, RuntimeError) as e:
        _fail(str(e))


@sim_app.command("info")
def sim_info(task: str = typer.Argument(..., help="task name, e.g. humanoid-walk"),
             spec: Optional[str] = typer.Option(None, help="robot spec YAML overriding the task's"),
             as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Print the task's robot spec (the sim-to-real contract), its hash and the model's sizes."""
    from s2r.sim.model import check_spec_against_model

    _set_threads(1)
    env = _make_env(task, 1, "mujoco", spec, 0)
    s, m = env.spec, env.model
    info = {
        "task": task, "robot": s.name, "spec_hash": s.hash(), "spec_file": s.source,
        "mjcf": str(s.resolve_mjcf()), "physics_dt": s.physics_dt, "decimation": s.decimation,
        "control_hz": round(1.0 / s.control_dt, 3), "action_type": s.action.type, "action_dim": env.action_dim,
        "obs_dim": env.obs_dim, "critic_obs_dim": env.critic_obs_dim, "episode_steps": env.max_episode_steps,
        "model": {"nq": m.nq, "nv": m.nv, "nu": m.nu, "nbody": m.nbody, "nsensor": m.nsensor,
                  "mass_kg": round(float(m.body_subtreemass[0]), 3)},
        "joints": [{"name": j.name, "default": j.default, "kp": j.kp, "kd": j.kd, "range": list(j.range),
                    "torque_limit": j.torque_limit} for j in s.joints],
        "observation": [{"name": t.name, "dim": t.dim, "scale": t.scale, "clip": t.clip}
                        for t in s.observation.terms],
        "history": {"length": s.observation.history_length, "order": s.observation.history_order},
        "reward_weights": env.reward_weights,
        "warnings": check_spec_against_model(s, m),
    }
    env.close()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"task {task}: robot '{s.name}'  spec hash {info['spec_hash']}")
    typer.echo(f"  spec  {s.source}\n  mjcf  {info['mjcf']}")
    typer.echo(f"  physics dt {s.physics_dt} s x decimation {s.decimation} -> control {info['control_hz']} Hz;"
               f" episode {env.max_episode_steps} steps")
    mm = info["model"]
    typer.echo(f"  model nq={mm['nq']} nv={mm['nv']} nu={mm['nu']} bodies={mm['nbody']} "
               f"sensors={mm['nsensor']} mass={mm['mass_kg']} kg")
    typer.echo(f"  action {s.action.type} dim {env.action_dim} scale {s.action.scale}")
    typer.echo("  joints (policy order):")
    for j in s.joints:
        typer.echo(f"    {j.name:28s} default {j.default:+.3f}  kp {j.kp:7.1f}  kd {j.kd:6.1f}  "
                   f"range [{j.range[0]:+.3f}, {j.range[1]:+.3f}]  tau {j.torque_limit:g}")
    typer.echo(f"  observation ({env.obs_dim} = {s.observation.frame_dim} x history "
               f"{s.observation.history_length}, {s.observation.history_order}):")
    for t in s.observation.terms:
        typer.echo(f"    {t.name:20s} dim {t.dim:3d}  scale {t.scale:g}  clip {t.clip:g}")
    typer.echo(f"  critic observation dim {env.critic_obs_dim}")
    typer.echo("  reward weights: " + ", ".join(f"{k}={v:g}" for k, v in env.reward_weights.items()))
    for w in info["warnings"]:
        typer.secho(f"  warning: {w}", fg=typer.colors.YELLOW)


@sim_app.command("play")
def sim_play(task: str = typer.Argument(..., help="task name"),
             video: Optional[Path] = typer.Option(None, help="write an MP4 of env 0"),
             plot: Optional[Path] = typer.Option(None, help="write a PNG of reward and episode stats"),
             steps: int = typer.Option(250, min=1, help="control steps"),
             num_envs: int = typer.Option(4, help="parallel envs (env 0 is filmed)"),
             policy: str = typer.Option("default", help="default (hold pose) | random | scripted (arm tasks)"),
             backend: str = typer.Option("mujoco", help="mujoco | warp"),
             device: str = typer.Option("cpu", help="torch/Warp device: cpu | cuda (warp backend)"),
             spec: Optional[str] = typer.Option(None, help="robot spec YAML overriding the task's"),
             seed: int = typer.Option(0),
             randomize: Optional[bool] = typer.Option(None, "--randomize/--no-randomize")):
    """Roll out a task without a trained policy; optionally film env 0."""
    _set_threads(1)
    import torch

    if num_envs <= 0:
        _fail(f"--num-envs must be > 0, got {num_envs}")
    if policy not in ("default", "random", "scripted"):
        _fail(f"unknown --policy '{policy}' (default | random | scripted)")
    env = _make_env(task, num_envs, backend, spec, seed, randomize, device=device)
    if policy == "scripted" and not hasattr(env.task, "scripted_action"):
        _fail(f"task {task} has no scripted policy; use --policy default or random")
    renderer = None
    if video is not None:
        from s2r.sim.render import EnvRenderer, RenderUnavailable

        try:
            renderer = EnvRenderer(env)
        except RenderUnavailable as e:
            _fail(str(e))
    gen = torch.Generator().manual_seed(seed)
    obs = env.reset()
    frames, rewards, successes = [], [], []
    ep_returns, ep_lengths = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        if policy == "random":
            a = (torch.rand(num_envs, env.action_dim, generator=gen) * 2 - 1).to(env.device)
        elif policy == "scripted":
            a = env.task.scripted_action()
        else:
            a = torch.zeros(num_envs, env.action_dim, device=env.device)
        obs, r, term, trunc, info = env.step(a)
        rewards.append(float(r[0]))
        if "success" in info:
            successes.append(bool(info["success"][0]))
        if "episode" in info:
            ep_returns += info["episode"]["return"].tolist()
            ep_lengths += info["episode"]["length"].tolist()
        if renderer is not None:
            frames.append(renderer.frame(0))
    wall = time.perf_counter() - t0
    summary = {"task": task, "steps": steps, "num_envs": num_envs, "policy": policy,
               "env0_return": round(sum(rewards), 3), "episodes_finished": len(ep_returns),
               "mean_episode_length": round(sum(ep_lengths) / len(ep_lengths), 1) if ep_lengths else None,
               "diverged": env.diverged_total, "wall_s": round(wall, 2)}
    if successes:
        summary["env0_success_at_end"] = successes[-1]
    if renderer is not None:
        from s2r.sim.render import write_video

        write_video(str(video), frames, fps=1.0 / env.control_dt)
        renderer.close()
        summary["video"] = str(video)
    if plot is not None:
        _plot_rollout(plot, rewards, env.control_dt, task)
        summary["plot"] = str(plot)
    env.close()
    typer.echo(json.dumps(summary))


def _plot_rollout(path: Path, rewards: list[float], dt: float, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from s2r.io import atomic_write_bytes
    import io

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([i * dt for i in range(len(rewards))], rewards)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("reward (env 0)")
    ax.set_title(task)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# s2r train --obs-norm: the observation normaliser's settings (TrainConfig fields; docs/TRAINING.md, "A new task")
OBS_NORM = {
    "centre": dict(normalize_obs=True, obs_norm_min_std=1.0, obs_norm_max_std=1.0),
    "capped": dict(normalize_obs=True, obs_norm_min_std=1.0, obs_norm_max_std=3.0),
    "scale": dict(normalize_obs=True, obs_norm_min_std=1.0, obs_norm_max_std=None),
    "standard": dict(normalize_obs=True, obs_norm_min_std=0.0, obs_norm_max_std=None),
    "off": dict(normalize_obs=False),
}


@app.command("train")
def train(task: Optional[str] = typer.Option(None, help="s2r task (humanoid-walk, arm-reach, ...), "
                                           "isaaclab:<Isaac Lab task id> (.venv-isaac) or gymnasium id"),
          algo: str = typer.Option("sac", help="sac | dsac-t"),
          policy: str = typer.Option("gaussian", help="gaussian | pmoe"),
          backend: str = typer.Option("mujoco", help="mujoco | warp (s2r tasks)"),
          num_envs: Optional[int] = typer.Option(None, help="parallel envs (default: the recipe's)"),
          steps: Optional[int] = typer.Option(None, help="total env steps (default: the recipe's)"),
          out: Optional[Path] = typer.Option(None, help="run directory (default runs/<task>-<algo>-<policy>-<seed>)"),
          resume: Optional[Path] = typer.Option(None, help="continue the run in this directory"),
          seed: int = typer.Option(0),
          device: Optional[str] = typer.Option(None, help="cpu | cuda (default: the recipe's, cpu if no CUDA)"),
          threads: int = typer.Option(1, help="torch intra-op threads"),
          utd: Optional[float] = typer.Option(None, help="gradient updates per vectorised env step"),
          batch_size: Optional[int] = typer.Option(None),
          bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast: CUDA, or CPUs with AVX512-BF16/AMX (output layers stay float32)"),
          compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the networks"),
          checkpoint_every: Optional[int] = typer.Option(None, help="env steps between checkpoints"),
          eval_every: Optional[int] = typer.Option(None, help="env steps between evaluations"),
          checkpoint_buffer: bool = typer.Option(False, help="store the replay buffer in checkpoints"),
          reward_norm: Optional[bool] = typer.Option(None, "--reward-norm/--no-reward-norm",
                                                     help="divide learning rewards by the running std of the "
                                                     "discounted return: learning that ignores the reward scale "
                                                     "(the recipe decides when not given; docs/TRAINING.md)"),
          reward_norm_std: Optional[float] = typer.Option(None, help="with --reward-norm: the std the returns are "
                                                          "brought to (the recipe's, else 1; docs/TRAINING.md)"),
          freeze_reward_norm: Optional[bool] = typer.Option(None, "--freeze-reward-norm/--no-freeze-reward-norm",
                                                            help="with --reward-norm: keep the warm-up's std"),
          obs_norm: Optional[str] = typer.Option(None, help="observation normaliser: centre (subtract the running "
                                                 "mean), capped (centre, and divide dims whose std is above 1 by it, "
                                                 "by at most 3: the generic setting), scale (the same without the "
                                                 "cap), standard (every dim to unit variance) or off; default: the "
                                                 "recipe's (docs/TRAINING.md)"),
          init_from: Optional[Path] = typer.Option(None, help="start from this run's newest checkpoint (weights, "
                                                   "Adam moments, normalisers): train a policy further, e.g. on a "
                                                   "shifted robot"),
          env_override: list[str] = typer.Option([], "--env-override", help="shift the task: KEY=VALUE, e.g. "
                                                 "randomization.motor_strength=0.8 (repeatable)"),
          settings: list[str] = typer.Option([], "--set", help="any training setting: KEY=VALUE, a TrainConfig "
                                             "field or agent.<AgentConfig field>, e.g. obs_norm_max_std=3 or "
                                             "agent.lr_actor=1e-3 (repeatable; applied last)"),
          progress: bool = typer.Option(True, "--progress/--no-progress")):
    """Train SAC or DSAC-T (Gaussian or PMOE head) on a task; writes a run directory.
    With --resume RUN the run's config.yaml decides everything but --steps, which sets its total."""
    from s2r.control.spec import SpecError
    from s2r.policies.checkpoint import CheckpointError
    from s2r.policies.recipes import recipe
    from s2r.policies.trainer import (Trainer, TrainingError, apply_settings, check_device, load_train_config,
                                      parse_setting)
    from s2r.sim.env import EnvError
    from s2r.sim.model import ModelError

    for flag, value in (("--num-envs", num_envs), ("--steps", steps), ("--batch-size", batch_size),
                        ("--checkpoint-every", checkpoint_every), ("--eval-every", eval_every),
                        ("--threads", threads)):
        if value is not None and value < 1:
            _fail(f"{flag} must be >= 1, got {value}")
    if utd is not None and not 0 <= utd < float("inf"):
        _fail(f"--utd must be a finite number >= 0, got {utd}")
    if reward_norm_std is not None and not 0 < reward_norm_std < float("inf"):
        _fail(f"--reward-norm-std must be a finite number > 0, got {reward_norm_std}")
    if obs_norm is not None and obs_norm not in OBS_NORM:
        _fail(f"unknown --obs-norm '{obs_norm}' ({' | '.join(OBS_NORM)})")
    try:
        settings_d = dict(parse_setting(item) for item in settings)
    except ValueError as e:
        _fail(f"--set {e}")
    if device is not None:
        try:
            check_device(device)
        except ValueError as e:
            _fail(f"--device: {e}")
    _init_distributed()
    try:
        if resume is not None:
            cfg_path = resume / "config.yaml"
            if not cfg_path.is_file():
                _fail(f"--resume {resume}: no config.yaml there (not a run directory)")
            cfg = load_train_config(cfg_path)
            ignored = [flag for flag, value in (("--task", task), ("--num-envs", num_envs), ("--out", out),
                                                ("--device", device), ("--utd", utd), ("--batch-size", batch_size),
                                                ("--bf16/--no-bf16", bf16), ("--compile/--no-compile", compile),
                                                ("--checkpoint-every", checkpoint_every),
                                                ("--eval-every", eval_every), ("--init-from", init_from),
                                                ("--reward-norm/--no-reward-norm", reward_norm),
                                                ("--reward-norm-std", reward_norm_std),
                                                ("--freeze-reward-norm", freeze_reward_norm),
                                                ("--obs-norm", obs_norm),
                                                ("--env-override", env_override or None),
                                                ("--set", settings or None)) if value is not None]
            if ignored:
                _note(f"{', '.join(ignored)} ignored with --resume: the run's {cfg_path} decides")
            if steps is not None and steps != cfg.total_steps:
                _note(f"--steps {steps}: the run's total_steps goes from {cfg.total_steps} to {steps}")
                cfg.total_steps = steps
            run_dir = resume
        else:
            if task is None:
                _fail("--task is required (or --resume RUN_DIR)")
            if algo not in ("sac", "dsac-t"):
                _fail(f"unknown --algo '{algo}' (sac | dsac-t)")
            if policy not in ("gaussian", "pmoe"):
                _fail(f"unknown --policy '{policy}' (gaussian | pmoe)")
            agent = {k: v for k, v in {"bf16": bf16, "compile": compile}.items() if v is not None}
            cfg = recipe(task, algo, policy, agent=agent, num_envs=num_envs, total_steps=steps, seed=seed,
                         backend=backend, device=device, threads=threads, updates_per_step=utd,
                         batch_size=batch_size, checkpoint_buffer=checkpoint_buffer, progress=progress,
                         checkpoint_every=checkpoint_every, eval_every=eval_every, reward_norm=reward_norm,
                         reward_norm_std=reward_norm_std, freeze_reward_norm=freeze_reward_norm)
            for key, value in OBS_NORM.get(obs_norm, {}).items():  # None is a value here (no cap), so not recipe()'s
                setattr(cfg, key, value)
            try:
                apply_settings(cfg, settings_d)
            except ValueError as e:
                _fail(f"--set: {e}")
            if (reward_norm_std is not None or freeze_reward_norm) and not cfg.reward_norm:
                _fail(f"--reward-norm-std and --freeze-reward-norm set up reward normalisation, which {task}'s "
                      f"recipe leaves off: give --reward-norm too")
            if env_override:
                from s2r.sim.overrides import merge_overrides, parse_env_overrides

                cfg.env_overrides = merge_overrides(cfg.env_overrides, parse_env_overrides(env_override, task))
            if init_from is not None:
                if not (init_from / "config.yaml").is_file():
                    _fail(f"--init-from {init_from}: no config.yaml there (not a run directory)")
                cfg.init_from = str(init_from)
            run_dir = out or Path("runs") / f"{task.replace('/', '_')}-{algo}-{policy}-{seed}"
            if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
                _fail(f"{run_dir} already holds a run; pass --resume {run_dir} or another --out")
        final = Trainer(cfg, run_dir, resume=resume is not None).train()
    except (SpecError, EnvError, ModelError, CheckpointError, TrainingError, ValueError) as e:
        _fail(str(e))
    _close_distributed()
    typer.echo(json.dumps({"run": str(run_dir), **final}))


def _close_distributed() -> None:
    """Tear the process group down while every rank is alive: a gloo group left to interpreter exit can
    abort a rank ("terminate called without an active exception") after a run that finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU; envs are sharded per rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


@app.command("eval")
def evaluate(run: Path = typer.Argument(..., help="run directory (or a checkpoint file)"),
             episodes: int = typer.Option(10, min=1),
             video: Optional[Path] = typer.Option(None, help="film env 0 of an s2r task"),
             seed: int = typer.Option(123)):
    """Evaluate a run's deterministic policy; optionally film it."""
    _set_threads(1)
    from s2r.policies.checkpoint import CheckpointError
    from s2r.policies.evaluate import evaluate_run

    try:
        result = evaluate_run(run, episodes=episodes, video=video, seed=seed)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(json.dumps(result))


@app.command("export")
def export(run: Path = typer.Argument(..., help="run directory (or a checkpoint file)"),
           out: Path = typer.Option(..., "--out", help="ONNX file to write, e.g. policy.onnx"),
           opset: int = typer.Option(17, help="ONNX opset (>= 17)"),
           rollout_steps: int = typer.Option(0, min=0, help="also verify on this many observations recorded in "
                                                            "the policy's own env (builds the simulator)")):
    """Export a run's deterministic policy (normaliser inside) to ONNX with the robot spec embedded;
    verified against torch with onnxruntime before the file is written. Needs only the checkpoint."""
    _set_threads(1)
    from s2r.control.spec import SpecError
    from s2r.policies.checkpoint import CheckpointError
    from s2r.policies.export import ExportError, export_onnx

    try:
        report = export_onnx(run, out, opset=opset, rollout_steps=rollout_steps)
    except (FileNotFoundError, CheckpointError, ExportError, SpecError, ValueError) as e:
        _fail(str(e))
    for note in report["notes"]:
        _note(note)
    typer.echo(json.dumps(report))


@ros_app.command("sim")
def ros_sim(policy: Path = typer.Argument(..., help="exported ONNX policy (s2r export)"),
            seconds: float = typer.Option(10.0, help="wall-clock seconds in POLICY mode after the gantry release"),
            spec: str = typer.Option("g1/g1.yaml", help="robot spec (path, or relative to sim/robots/)"),
            vx: float = typer.Option(0.0, help="/cmd_vel linear x, m/s"),
            vy: float = typer.Option(0.0, help="/cmd_vel linear y, m/s"),
            yaw_rate: float = typer.Option(0.0, help="/cmd_vel angular z, rad/s"),
            video: Optional[Path] = typer.Option(None, help="write the sim bridge's trajectory as MP4"),
            out: Optional[Path] = typer.Option(None, help="also write the JSON report here"),
            shift: list[str] = typer.Option([], "--shift", help="the simulated robot differs from the model: "
                                            "FIELD=SCALE, e.g. motor_strength=0.8 (repeatable)"),
            strict: bool = typer.Option(False, help="exit 1 unless the robot stayed up in POLICY mode")):
    """Sim-to-sim over ROS 2: the policy node drives the MuJoCo sim bridge over DDS (gantry, ramp,
    start, release, hold /cmd_vel), then reports height, tilt and command tracking."""
    _set_threads(1)
    if seconds <= 0:
        _fail(f"--seconds must be > 0, got {seconds}")
    if not policy.is_file():
        _fail(f"policy file '{policy}' not found (make one with: s2r export RUN --out policy.onnx)")
    _check_policy(policy, spec)
    from s2r.sim.randomization import parse_model_shift

    try:
        model_shift = ",".join(f"{k}={v}" for k, v in parse_model_shift(",".join(shift)).items())
    except ValueError as e:
        _fail(f"--shift: {e}")
    try:
        from s2r.ros.sim_loop import SimLoopConfig, render_trajectory, run_sim_loop
    except ImportError as e:
        _fail(f"ROS 2 Python packages are missing ({e}); install them with: pip install 's2r[ros]'")
    from s2r.control.spec import SpecError

    try:
        report = run_sim_loop(SimLoopConfig(policy_path=str(policy), robot_spec=spec, seconds=seconds,
                                            command=(vx, vy, yaw_rate), model_shift=model_shift))
    except (SpecError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(report.summary())
    if video is not None and report.trajectory:
        n = render_trajectory(report, str(video), robot_spec=spec)
        typer.echo(f"video: {video} ({n} frames)")
    doc = report.to_json()
    if out is not None:
        from s2r.io import atomic_write_text

        atomic_write_text(out, json.dumps(doc, indent=2))
    typer.echo(json.dumps(doc))
    if strict and not report.ok:
        raise typer.Exit(1)


@ros_app.command("hil-session")
def ros_hil_session(run: Path = typer.Argument(..., help="trained arm run directory (s2r train --task arm-reach)"),
                    out: Path = typer.Option(..., help="folder for policy versions, the learner's run/, recordings"),
                    seconds: float = typer.Option(60.0, help="wall-clock seconds of the session in POLICY mode"),
                    spec: str = typer.Option("panda/panda.yaml", help="robot spec (path, or relative to sim/robots/)"),
                    utd: float = typer.Option(1.0, help="learner updates per transition"),
                    publish_every: int = typer.Option(400, help="learner updates between published versions"),
                    seed: int = typer.Option(0, help="goals and the operator's noise"),
                    strict: bool = typer.Option(False, help="exit 1 unless the session ran to its end in POLICY")):
    """A live correction session over ROS 2: sim bridge, policy node streaming transitions, a scripted operator
    on /joy (takeovers, labels), the online learner publishing versions that the node swaps in at episode ends;
    then a report (s2r/ros/hil_loop.py)."""
    _set_threads(1)
    if seconds <= 0:
        _fail(f"--seconds must be > 0, got {seconds}")
    try:
        from s2r.ros.hil_loop import HilLoopConfig, run_hil_loop
    except ImportError as e:
        _fail(f"ROS 2 Python packages are missing ({e}); install them with: pip install 's2r[ros]'")
    from s2r.control.spec import SpecError
    from s2r.policies.checkpoint import CheckpointError
    from s2r.policies.export import ExportError

    try:
        report = run_hil_loop(HilLoopConfig(run=str(run), out_dir=str(out), seconds=seconds, robot_spec=spec,
                                            seed=seed, learner={"utd": utd, "publish_every_updates": publish_every}))
    except (SpecError, CheckpointError, ExportError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(report.summary())
    doc = report.to_json()
    from s2r.io import atomic_write_text

    atomic_write_text(out / "session.json", json.dumps(doc, indent=2))
    typer.echo(f"report: {out / 'session.json'}")
    if strict and not report.ok:
        raise typer.Exit(1)


def _check_policy(policy: Path, spec: str) -> None:
    """Load the policy as the robot's node will (OnnxPolicy against --spec); fail with one line if it cannot."""
    from s2r.control.onnx_policy import OnnxPolicy, PolicyFileError
    from s2r.control.spec import RobotSpec, SpecError
    from s2r.sim.tasks import resolve_spec_path  # a path as given, or relative to sim/robots/ (as the node does)

    try:
        OnnxPolicy(policy, expected_spec=RobotSpec.load(resolve_spec_path(spec)))
    except (SpecError, PolicyFileError, FileNotFoundError, ValueError) as e:
        _fail(str(e))


@bench_app.command("sim")
def bench_sim(quick: bool = typer.Option(False, help="at most ~60 s"),
              envs: str = typer.Option("1,16,64,256", help="comma-separated env counts"),
              out: Optional[Path] = typer.Option(None, help="also write the JSON result here")):
    """Simulation throughput: s2r vs gymnasium vector envs vs raw mujoco.rollout."""
    from s2r.bench_sim import run

    try:
        counts = [int(x) for x in envs.split(",") if x.strip()]
    except ValueError:
        _fail(f"--envs must be comma-separated integers, got '{envs}'")
    if not counts or min(counts) <= 0:
        _fail(f"--envs must list positive integers, got '{envs}'")
    result = run(counts, quick=quick)
    line = json.dumps(result)
    if out is not None:
        from s2r.io import atomic_write_text

        atomic_write_text(out, line + "\n")
    typer.echo(line)


@data_app.command("inspect")
def data_inspect(files: list[Path] = typer.Argument(..., metavar="FILE",
                                                  help="recordings (*.mcap), or folders of them")):
    """Episodes, steps, duration, intervention rate (per episode, per minute), success rate, sources,
    robot spec, policy and operator of recorded sessions; a table, then a JSON line."""
    from s2r.data import DataError, format_inspect, inspect_recordings

    try:
        report = inspect_recordings(files)
    except DataError as e:
        _fail(str(e))
    typer.echo(format_inspect(report))
    typer.echo(json.dumps(report))


@data_app.command("export")
def data_export(files: list[Path] = typer.Argument(..., metavar="FILE",
                                                 help="recordings (*.mcap), or folders of them"),
                out: Path = typer.Option(..., "--out", help="dataset folder to create (new or empty)")):
    """Export recordings of one robot spec as a LeRobot-style dataset: Parquet per episode + meta/."""
    from s2r.data import DataError, export_lerobot

    try:
        result = export_lerobot(files, out)
    except DataError as e:
        _fail(str(e))
    for w in result["warnings"]:
        _note(w)
    typer.echo(json.dumps(result))


def _hidden_widths(text: str) -> tuple[int, ...]:
    """--hidden '64,64' -> (64, 64); '' or 'none' -> () (logistic regression)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        widths = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        _fail(f"--hidden must be comma-separated widths such as 64,64 (or none), got '{text}'")
    if any(w < 1 for w in widths):
        _fail(f"--hidden widths must be >= 1, got '{text}'")
    return widths


def _classifier_summary(m: dict) -> str:
    h = m["heldout"]
    return (f"success classifier: held-out precision {h['precision']:.3f}, recall {h['recall']:.3f} at threshold "
            f"{m['threshold']:.4g} ({m['threshold_rule']}); {h['episodes']} held-out episodes, {h['ticks']} ticks, "
            f"{h['positives']} positive")


@data_app.command("classifier")
def data_classifier(files: list[Path] = typer.Argument(..., metavar="FILE",
                                                     help="recordings (*.mcap) with labelled episodes, or folders"),
                    out: Path = typer.Option(..., "--out", help="classifier file to write, e.g. success.pt"),
                    positive_ticks: int = typer.Option(5, help="last ticks of a success-labelled episode that are positives"),
                    hidden: str = typer.Option("64,64", help="MLP widths, comma-separated; none: logistic regression"),
                    steps: int = typer.Option(500, help="Adam steps"),
                    holdout: float = typer.Option(0.3, help="share of the episodes held out to choose the threshold"),
                    min_precision: float = typer.Option(0.9, help="threshold: highest held-out recall at this precision"),
                    seed: int = typer.Option(0)):
    """Train a success classifier (p(success | observation), HIL-SERL's reward) on the labelled
    episodes of recordings; the threshold is chosen on held-out episodes. Prints its metrics as JSON."""
    _set_threads(1)
    from s2r.finetune import FinetuneError, train_classifier
    from s2r.policies.success import ClassifierConfig, ClassifierError

    try:
        cfg = ClassifierConfig(positive_ticks=positive_ticks, hidden=_hidden_widths(hidden), steps=steps,
                               holdout=holdout, min_precision=min_precision, seed=seed)
        cfg.check()
        _, report = train_classifier(files, out, cfg)
    except (FinetuneError, ClassifierError) as e:
        _fail(str(e))
    _note(_classifier_summary(report))
    typer.echo(json.dumps(report))


@app.command("finetune", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune_cmd(ctx: typer.Context,
                 run: Path = typer.Option(..., "--from", help="trained run directory (s2r train, or a finetune)"),
                 world_model: Optional[Path] = typer.Option(None, "--world-model", help="finetune on the run's task "
                                                            "through this world model instead of recordings: "
                                                            "`s2r wm finetune` (its options, e.g. --rounds, "
                                                            "--env-override, may follow)"),
                 data: Optional[list[Path]] = typer.Option(None, "--data", help="recordings (*.mcap) or folders; "
                                                           "files after the options count as --data too"),
                 out: Path = typer.Option(..., "--out", help="run directory to write (new)"),
                 demos: Optional[list[Path]] = typer.Option(None, "--demos", help="teleoperated demonstration "
                                                            "recordings (repeat --demos per file, or a folder)"),
                 reward: str = typer.Option("labels", help="recorded | labels | classifier"),
                 classifier: Optional[Path] = typer.Option(None, help="success classifier file (--reward classifier)"),
                 train_classifier: bool = typer.Option(False, "--train-classifier", help="train the success "
                                                       "classifier on the labelled episodes of the recordings"),
                 positive_ticks: int = typer.Option(5, help="--train-classifier: positive ticks per success episode"),
                 updates: Optional[int] = typer.Option(None, help="gradient updates (default: utd x transitions)"),
                 batch_size: int = typer.Option(256),
                 demo_fraction: float = typer.Option(0.5, help="share of each batch from the demonstration buffer"),
                 utd: float = typer.Option(1.0, help="updates per transition, for the default --updates"),
                 init_alpha: float = typer.Option(1e-2, help="initial SAC temperature"),
                 critic_actor_ratio: int = typer.Option(2, help="critic updates per actor update"),
                 critic_warmup: int = typer.Option(500, help="critic-only updates before the actor moves"),
                 seed: int = typer.Option(0),
                 export: Optional[Path] = typer.Option(None, help="also write the verified ONNX policy here"),
                 device: str = typer.Option("cpu", help="cpu | cuda"),
                 progress: bool = typer.Option(True, "--progress/--no-progress")):
    """Finetune a trained run offline on recorded sessions with operator corrections (RLPD: intervened
    ticks also go to the demonstration buffer); writes a new run and, with --export, the ONNX policy."""
    _set_threads(1)
    from s2r.finetune import FinetuneError, finetune
    from s2r.policies.hil import HILConfig
    from s2r.policies.success import ClassifierConfig
    from s2r.policies.trainer import check_device

    if world_model is not None:  # LIFT-style finetuning through a world model: `s2r wm finetune`
        if data:
            _fail("--world-model finetunes on a target system through the model; --data recordings are for offline "
                  "finetuning: give one or the other")
        args = ["--from", str(run), "--world-model", str(world_model), "--out", str(out), "--seed", str(seed),
                "--batch-size", str(batch_size),
                *(["--export", str(export)] if export is not None else []), *([] if progress else ["--no-progress"]),
                *ctx.args]
        typer.main.get_command(wm_app).commands["finetune"].main(args, prog_name="s2r finetune --world-model")
    extra = [Path(a) for a in ctx.args]
    if any(a.startswith("-") for a in ctx.args):
        _fail(f"unknown option(s) {[a for a in ctx.args if a.startswith('-')]} (s2r finetune --help)")
    if extra and demos:
        _fail(f"files after the options ({', '.join(map(str, extra))}) are ambiguous next to --demos: put --data "
              f"before each recording and --demos before each demonstration (or name folders)")
    files = list(data or []) + extra
    if not files:
        _fail("no recordings given: --data FILE... (or folders of *.mcap)")
    try:
        check_device(device)
    except ValueError as e:
        _fail(f"--device: {e}")
    cfg = HILConfig(batch_size=batch_size, demo_fraction=demo_fraction, utd=utd, init_alpha=init_alpha,
                    critic_actor_ratio=critic_actor_ratio, critic_warmup=critic_warmup, seed=seed)
    bar = None
    if progress:
        from tqdm import tqdm

        def show(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, unit="update", dynamic_ncols=True, desc="finetune")
            bar.update(1)
    try:
        report = finetune(run, files, out, cfg, demos=demos or (), reward=reward, classifier=classifier,
                          train_classifier_cfg=ClassifierConfig(positive_ticks=positive_ticks, seed=seed)
                          if train_classifier else None,
                          updates=updates, export=export, device=device, progress=show if progress else None,
                          note=_note)
    except FinetuneError as e:
        _fail(str(e))
    finally:
        if bar is not None:
            bar.close()
    if report["classifier"] is not None:
        _note(_classifier_summary(report["classifier"]))
    typer.echo(json.dumps(report))


TRAINING_MODULES = ("torch", "mujoco", "gymnasium", "matplotlib", "imageio", "tensorboard", "onnx", "tqdm")


def main() -> None:
    try:
        app()
    except ModuleNotFoundError as e:  # a robot install (no `train` extra) running a training command
        if (e.name or "").split(".")[0] not in TRAINING_MODULES:
            raise
        typer.secho(f"error: this command needs the training install ({e.name} is missing): "
                    f"pip install 's2r[train]'", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

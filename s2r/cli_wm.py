"""`s2r wm`: train and evaluate diffusion world models (world_models/).

    s2r wm train --task humanoid-stand --policy policies/pretrained/g1_stand.onnx --out runs/wm_stand
    s2r wm train --recording session.mcap --out runs/wm_robot
    s2r wm eval runs/wm_stand [--horizon 50] [--json]

A run dir holds config.json, checkpoints/ckpt_<step>.pt (verified, atomic; the robot spec inside),
tb/ (TensorBoard), loss.png and, after eval, eval.json and horizon_error.png. Heavy imports happen
inside the commands so `s2r --help` stays fast. Bad input: one `error:` line, exit 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

wm_app = typer.Typer(no_args_is_help=True, help="Diffusion world models: train from sim rollouts or recordings, "
                                                "evaluate fidelity")


def _fail(msg: str) -> None:
    from s2r.cli import _fail as fail

    fail(msg)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (files, specs, layouts), reported as one line."""
    from s2r.control.onnx_policy import PolicyFileError
    from s2r.control.recording import RecordingError
    from s2r.control.spec import SpecError
    from s2r.policies.checkpoint import CheckpointError
    from s2r.sim.env import EnvError
    from s2r.sim.tasks import UnknownTaskError
    from s2r.world_models.diffusion import WorldModelError

    return (PolicyFileError, RecordingError, SpecError, CheckpointError, EnvError, UnknownTaskError,
            WorldModelError, FileNotFoundError, ValueError)


def _noise(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        _fail(f"--noise takes 'low,high' action-noise stds, e.g. 0.0,0.3 (got {text!r})")
    if not 0 <= lo <= hi:
        _fail(f"--noise needs 0 <= low <= high, got {text!r}")
    return lo, hi


def _gather(task: Optional[str], policy: Optional[str], recordings: list[str], envs: int, rollout_steps: int,
            noise: tuple[float, float], seed: int, progress: bool):
    """Transitions from sim rollouts (task + policy) and/or recordings, one robot spec."""
    from s2r.control.spec import check_spec_hash
    from s2r.world_models.data import cat_transitions, collect_rollouts, from_recordings, load_actor

    if task is None and not recordings:
        _fail("no data: give --task (with --policy, or random actions) for sim rollouts, and/or --recording FILE.mcap")
    parts = []
    if task is not None:
        from s2r.sim.tasks import make_task

        spec = make_task(task).spec
        act = load_actor(policy, spec) if policy is not None else None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=rollout_steps, desc=f"rollouts {task}", unit="step", leave=False)
        parts.append(collect_rollouts(task, act, envs, rollout_steps, noise, seed,
                                      progress=(lambda t: bar.update(1)) if bar is not None else None))
        if bar is not None:
            bar.close()
    if recordings:
        rec = from_recordings(recordings, parts[0].spec if parts else None)
        if parts:
            check_spec_hash(rec.spec.hash() if rec.spec else None, parts[0].spec, f"recordings {recordings}")
            if rec.state.shape[1] != parts[0].state.shape[1]:
                raise ValueError(f"recordings hold the policy observation ({rec.state.shape[1]} wide) but the sim "
                                 f"rollouts of {task} the critic observation ({parts[0].state.shape[1]}); train "
                                 f"on one source")
        parts.append(rec)
    return cat_transitions(parts) if len(parts) > 1 else parts[0]


@wm_app.command("train")
def train_cmd(
    out: Path = typer.Option(..., "--out", help="run directory (created)"),
    task: Optional[str] = typer.Option(None, help="s2r task to collect rollouts in (e.g. humanoid-stand)"),
    policy: Optional[str] = typer.Option(None, help="ONNX export or training run/checkpoint driving the rollouts "
                                                    "(default: uniform random actions)"),
    recording: list[str] = typer.Option([], "--recording", help="MCAP recording(s) to train on (repeatable)"),
    envs: int = typer.Option(16, help="parallel envs for rollouts"),
    rollout_steps: int = typer.Option(500, help="vectorised env steps of rollouts"),
    noise: str = typer.Option("0.0,0.3", help="action-noise std range: each env draws its std uniformly in it"),
    steps: int = typer.Option(3000, help="gradient steps"),
    batch_size: int = typer.Option(512),
    lr: float = typer.Option(1e-3),
    history: int = typer.Option(2, help="k: states and actions the model conditions on"),
    width: int = typer.Option(512),
    blocks: int = typer.Option(4),
    context_noise: float = typer.Option(0.0, help="L: noise of a level in [0, L] state stds on the context states "
                                                  "in training (0: off; docs/WORLD_MODELS.md measured 0.3)"),
    sim_prior: bool = typer.Option(False, "--sim-prior/--no-sim-prior",
                                   help="learn what the task's nominal simulator misses: each step starts from the "
                                        "simulator's next state (world_models/sim_prior.py; humanoid tasks)"),
    members: int = typer.Option(1, help="denoisers trained side by side (a deep ensemble): imagination's u is then "
                                        "their disagreement, where the data did not pin the model down"),
    held_out: float = typer.Option(0.1, help="share of episodes held out for the final one-step error"),
    checkpoint_every: int = typer.Option(1000, help="gradient steps between checkpoints"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch threads"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Train a diffusion world model; prints a JSON summary (held-out one-step error) as the last line."""
    for name, v, lo in (("--envs", envs, 1), ("--rollout-steps", rollout_steps, 2), ("--steps", steps, 1),
                        ("--batch-size", batch_size, 1), ("--history", history, 1), ("--width", width, 8),
                        ("--blocks", blocks, 1), ("--checkpoint-every", checkpoint_every, 1),
                        ("--members", members, 1)):
        if v < lo:
            _fail(f"{name} must be >= {lo}, got {v}")
    if not 0 < held_out < 1:
        _fail(f"--held-out must be between 0 and 1, got {held_out}")
    if not (math.isfinite(context_noise) and context_noise >= 0):
        _fail(f"--context-noise must be a finite number >= 0, got {context_noise}")
    if policy is not None and task is None:
        _fail("--policy drives sim rollouts: give --task too")
    if sim_prior and (task is None or recording):
        _fail("--sim-prior needs sim rollouts of a --task (the simulator's state is the task's critic observation; "
              "recordings hold the policy observation only)")
    lo_hi = _noise(noise)
    import torch

    torch.set_num_threads(threads)
    from s2r.io import atomic_write_text
    from s2r.policies.checkpoint import checkpoint_path, prune_checkpoints
    from s2r.world_models.diffusion import DiffusionWorldModel, WorldModelConfig, save_world_model
    from s2r.world_models.train import FitConfig, diffusion_stepper, one_step_error, plot_png, train_diffusion

    try:
        data = _gather(task, policy, recording, envs, rollout_steps, lo_hi, seed, progress)
        sim, prior_extra = None, {}
        if sim_prior:
            from s2r.world_models.sim_prior import SimPrior, SimPriorConfig, sim_prior_extra

            sim = SimPrior(SimPriorConfig(task=task, num_envs=min(256, len(data))), data.layout)
            data, prior_extra = data.with_prior(sim), sim_prior_extra(sim.cfg)
        train, held = data.split_episodes(held_out, seed)
        torch.manual_seed(seed)
        cfg = WorldModelConfig(data.state.shape[1], data.action.shape[1], history=history, width=width, blocks=blocks,
                               context_noise=context_noise, sim_prior=sim_prior, members=members)
        model = DiffusionWorldModel(cfg)
        out.mkdir(parents=True, exist_ok=True)
        run_cfg = {"task": task, "policy": policy, "recordings": recording, "envs": envs,
                   "rollout_steps": rollout_steps, "noise": list(lo_hi), "steps": steps, "batch_size": batch_size,
                   "lr": lr, "history": history, "width": width, "blocks": blocks, "context_noise": context_noise,
                   "sim_prior": sim_prior, "members": members, "held_out": held_out,
                   "seed": seed, "obs_key": data.obs_key, "transitions": len(data)}
        atomic_write_text(out / "config.json", json.dumps(run_cfg, indent=2))
        writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        except ImportError:
            pass
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc="world model", unit="step", dynamic_ncols=True)
        extra = {"run": json.dumps(run_cfg), "obs_key": data.obs_key, "layout": json.dumps(data.layout), **prior_extra}

        def log(step: int, loss: float) -> None:
            if writer is not None:
                writer.add_scalar("train/loss", loss, step)
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{loss:.4f}")
            if step % checkpoint_every == 0 and step < steps:
                save_world_model(checkpoint_path(out, step), model, data.spec, extra)
                prune_checkpoints(out, keep=3)
                model.train()

        hist = train_diffusion(model, train, FitConfig(steps, batch_size, lr, seed=seed), log=log,
                               log_every=math.gcd(50, checkpoint_every))  # every checkpoint step is a log step
        if bar is not None:
            bar.close()
        err = one_step_error(diffusion_stepper(model, 3, generator=torch.Generator().manual_seed(seed), sim=sim),
                             held, history)
        extra["held_out_one_step_error"] = err["one_step_error"]
        save_world_model(checkpoint_path(out, steps), model, data.spec, extra)
        prune_checkpoints(out, keep=3)
        if writer is not None:
            writer.add_scalar("eval/one_step_error", err["one_step_error"], steps)
            writer.close()
        plot_png(out / "loss.png", {"EDM loss": ([s for s, _ in hist], [v for _, v in hist])}, "gradient step",
                 "loss", f"world model {task or 'recordings'}", logy=True)
    except _user_errors() as e:
        _fail(str(e))
    summary = {"run": str(out), "checkpoint": str(checkpoint_path(out, steps)), "transitions": len(data),
               "held_out_episodes": int(held.episode.unique().numel()), "final_loss": hist[-1][1],
               "one_step_error": err["one_step_error"]}
    typer.echo(json.dumps(summary))


@wm_app.command("eval")
def eval_cmd(
    run: Path = typer.Argument(..., help="world-model run dir or checkpoint file"),
    task: Optional[str] = typer.Option(None, help="task for fresh held-out rollouts (default: the run's)"),
    policy: Optional[str] = typer.Option(None, help="policy for them (default: the run's)"),
    recording: list[str] = typer.Option([], "--recording", help="evaluate on these recordings instead"),
    envs: int = typer.Option(8),
    rollout_steps: int = typer.Option(300),
    noise: Optional[str] = typer.Option(None, help="action-noise std range (default: the run's)"),
    horizon: int = typer.Option(50, help="open-loop horizon H"),
    samples: int = typer.Option(8, help="samples per step for the uncertainty"),
    sampling_steps: int = typer.Option(3, help="sampler steps (1-10)"),
    solver: str = typer.Option("euler", help="euler | heun"),
    seed: int = typer.Option(1000, help="seed of the held-out rollouts (not the training one)"),
    as_json: bool = typer.Option(False, "--json", help="print the whole result as JSON only"),
    threads: int = typer.Option(1),
) -> None:
    """One-step and H-step errors, failure agreement and uncertainty-error correlation on held-out data."""
    if horizon < 1 or samples < 2:
        _fail(f"--horizon must be >= 1 and --samples >= 2 (got {horizon}, {samples})")
    import torch

    torch.set_num_threads(threads)
    from s2r.policies.checkpoint import latest_checkpoint
    from s2r.world_models.diffusion import load_world_model
    from s2r.world_models.train import (diffusion_stepper, diffusion_uncertainty, failure_agreement, horizon_errors,
                                        one_step_error, plot_png, uncertainty_calibration)

    try:
        path = run
        if run.is_dir():
            path = latest_checkpoint(run)
            if path is None:
                raise FileNotFoundError(f"{run} holds no valid world-model checkpoint (checkpoints/ckpt_*.pt)")
        model, spec, payload = load_world_model(path)
        cfg = json.loads(payload.get("run", "{}"))
        task = task if task is not None else (cfg.get("task") if not recording else None)
        policy = policy if policy is not None else cfg.get("policy")
        lo_hi = _noise(noise) if noise is not None else tuple(cfg.get("noise", (0.0, 0.3)))
        held = _gather(task, policy if task else None, recording, envs, rollout_steps, lo_hi, seed, False)
        if spec is not None and held.spec is not None and spec.hash() != held.spec.hash():
            from s2r.control.spec import check_spec_hash

            check_spec_hash(spec.hash(), held.spec, f"world model {path}")
        if held.state.shape[1] != model.cfg.state_dim:
            raise ValueError(f"the evaluation data's states are {held.state.shape[1]} wide, the model's "
                             f"{model.cfg.state_dim}: it was trained on another observation")
        k = model.cfg.history
        gen = torch.Generator().manual_seed(seed)
        sim = None
        if model.cfg.sim_prior:  # the simulator it corrects, rebuilt from its file
            from s2r.world_models.sim_prior import sim_prior_from_payload

            sim = sim_prior_from_payload(payload, held.layout or {}, 256)
        step = diffusion_stepper(model, sampling_steps, solver, gen, sim=sim)
        H = horizon
        curve = horizon_errors(step, held, k, H, clamp=(model.state_lo, model.state_hi))
        fallen = None
        if held.layout and "critic.base_height" in held.layout:
            from s2r.world_models.imagined_env import ImaginedEnv, ImaginedEnvConfig

            fallen = ImaginedEnv(model, held, 1, ImaginedEnvConfig(), spec=spec, sim=sim).fallen
        result = {"checkpoint": str(path), "task": task, "transitions": len(held), **one_step_error(step, held, k),
                  "h_step_error": {str(h): float(curve[h - 1]) for h in (1, 5, 10, 20, H) if h <= H},
                  **uncertainty_calibration(diffusion_uncertainty(model, samples, sampling_steps, solver, gen,
                                                                  sim=sim), held, k),
                  "failures": failure_agreement(step, held, k, fallen=fallen)}
    except _user_errors() as e:
        _fail(str(e))
    out_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    from s2r.io import atomic_write_text

    plot_png(out_dir / "horizon_error.png", {"diffusion": (list(range(1, H + 1)), curve.tolist())},
             "open-loop horizon H (steps)", "state error (data stds)", f"world model {task or 'recordings'}")
    atomic_write_text(out_dir / "eval.json", json.dumps(result, indent=2))
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"one-step error {result['one_step_error']:.4f} | H-step "
               + ", ".join(f"H={h}: {v:.3f}" for h, v in result["h_step_error"].items())
               + f" | u-error correlation (Spearman) {result['u_error_spearman']:.3f}"
               + f" | falls {result['failures']['real_falls']} real, recall {result['failures']['fall_recall']:.2f}")
    typer.echo(json.dumps(result))


@wm_app.command("finetune")
def finetune_cmd(
    run: Path = typer.Option(..., "--from", help="pretrained run directory (s2r train) or checkpoint"),
    world_model: Path = typer.Option(..., "--world-model", help="world-model run dir or checkpoint (s2r wm train "
                                                                "--task: a model of the critic observation)"),
    out: Path = typer.Option(..., "--out", help="run directory to write (new)"),
    task: Optional[str] = typer.Option(None, help="target task (default: the run's)"),
    env_override: list[str] = typer.Option([], "--env-override", help="shift the target: KEY=VALUE, e.g. "
                                           "randomization.friction=0.4, randomization.motor_strength=0.8, "
                                           "randomization.latency_steps=[4,4], episode_length_s=10 (repeatable)"),
    learner: str = typer.Option("finetune", help="finetune: rounds of short imagined branches and anchored "
                                "updates (world_models/finetune.py); trainer: the run's own trainer inside the model "
                                "after one collection (world_models/dyna.py)"),
    target_steps: int = typer.Option(10_000, help="--learner trainer: deterministic target steps before imagining"),
    trainer_steps: int = typer.Option(100_000, help="--learner trainer: the trainer's env steps inside the model"),
    trainer_horizon: int = typer.Option(250, help="--learner trainer: imagined steps before truncation"),
    trainer_rounds: int = typer.Option(1, help="--learner trainer: collect -> model -> trainer cycles, the "
                                               "target and trainer steps split over them; from the second the "
                                               "target runs the trainer's current policy (MBPO's loop)"),
    trainer_select: str = typer.Option("last", help="--learner trainer: the result is the last checkpoint, or "
                                   "'model': the one whose policy scores best in imagined episodes from the target's "
                                   "episode starts (no target steps spent choosing)"),
    trainer_imagine: str = typer.Option("model", help="--learner trainer: explore in the world 'model', or in the "
                                        "'sim'ulator a sim-prior model corrects, at the physics --identify estimates "
                                        "(the task's randomisation centred on it; no learned residual)"),
    trainer_checkpoint_every: Optional[int] = typer.Option(None, help="--learner trainer: imagined steps between "
                                                           "checkpoints (candidates for --trainer-select model)"),
    rounds: int = typer.Option(10, help="collect -> model -> imagine -> update rounds"),
    real_steps: int = typer.Option(50, help="K: vectorised deterministic steps on the target per round"),
    target_envs: int = typer.Option(4, help="parallel target instances"),
    imagined_envs: int = typer.Option(256, help="parallel imagined rollouts"),
    imagined_steps: int = typer.Option(50, help="vectorised imagined steps per round"),
    utd: float = typer.Option(1.0, help="SAC/DSAC-T updates per imagined step"),
    real_ratio: float = typer.Option(0.06, help="share of real target transitions per batch (LIFT 0.06)"),
    batch_size: int = typer.Option(256),
    tau: float = typer.Option(0.001, help="critic target Polyak factor (LIFT 0.001)"),
    critic_warmup: int = typer.Option(0, help="critic-only updates before the actor moves"),
    lr_actor: Optional[float] = typer.Option(None, help="the actor's learning rate while finetuning (default: "
                                                        "the run's)"),
    anchor_weight: Optional[float] = typer.Option(None, help="pull the actor's mean action toward the pretrained "
                                                             "policy's on every batch row, weight x mean |Q| (0: off; "
                                                             "default: WMFinetuneConfig's)"),
    identify: bool = typer.Option(False, "--identify/--no-identify",
                                  help="estimate the randomised-physics terms from target data with the model (it "
                                       "must have seen them vary); the model uses the estimate, the critics the "
                                       "pretraining mean (--learner trainer: the estimate); a sim-prior model: "
                                       "the simulator's motor strength, mass and friction scales by its own "
                                       "one-step error, and imagination steps the estimate"),
    sim_randomize: bool = typer.Option(True, "--sim-randomize/--no-sim-randomize",
                                       help="a sim-prior model: each imagined rollout steps one robot of the task's "
                                            "domain randomisation around the (identified) physics, with its pushes; "
                                            "off: one fixed robot"),
    nominal_sim_terms: bool = typer.Option(True, "--nominal-sim-terms/--measured-sim-terms",
                                           help="critics read the task's randomised-physics terms at their pretraining "
                                                "mean (unknown on a robot) or as the target reports them"),
    horizon: str = typer.Option("1,20", help="imagined horizon ramp 'first,last' over the rounds (LIFT 1,20)"),
    model_updates: int = typer.Option(200, help="world-model gradient steps on the target data per round"),
    model_lr: float = typer.Option(3e-4),
    penalty: float = typer.Option(1.0, help="lambda in r - lambda u"),
    u_max: float = typer.Option(1.0, help="u above this halts an imagined rollout"),
    samples: int = typer.Option(4, help="model samples per imagined step (their spread is u; 1: no u)"),
    eval_envs: int = typer.Option(8, help="deterministic evaluation episodes on the target per round (0: none)"),
    seed: int = typer.Option(0),
    export: Optional[Path] = typer.Option(None, help="also write the verified ONNX policy here"),
    threads: int = typer.Option(1, help="torch threads"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="one line per round on stderr"),
) -> None:
    """Safe finetuning (LIFT): the target runs only the deterministic policy; SAC/DSAC-T explore in the world
    model from real target states. Writes a run dir for s2r export / s2r eval; JSON report as the last line."""
    try:
        h0, h1 = (int(v) for v in horizon.split(","))
    except ValueError:
        _fail(f"--horizon takes 'first,last' whole numbers, e.g. 1,20 (got {horizon!r})")
    import torch

    torch.set_num_threads(threads)
    from s2r.sim.overrides import parse_env_overrides
    from s2r.world_models.finetune import WMFinetuneConfig, finetune_with_world_model
    from s2r.world_models.imagined_env import ImaginedEnvConfig

    def show(row: dict) -> None:
        ident = "".join(f" {k[len('identified_'):]} {v:.3f}" for k, v in row.items() if k.startswith("identified_"))
        typer.echo(f"round {row['round']}: target steps {row['target_steps']}, falls {row['target_falls']} | "
                   + (f"identified{ident} | " if ident else "") +
                   f"imagined {row['imagined_steps']} (H={row['horizon']}), halted nan {row['halted_nan']} / "
                   f"u {row['halted_uncertain']} / fell {row['unsafe']} / joint limit {row['joint_limit']} | "
                   f"updates {row['updates']} | eval "
                   f"return {row.get('eval_return_mean', float('nan')):.1f}, fell "
                   f"{row.get('eval_terminated_rate', float('nan')):.2f}", err=True)

    try:
        if samples < 1:
            raise ValueError(f"--samples must be >= 1, got {samples}")
        if learner not in ("finetune", "trainer"):
            raise ValueError(f"--learner must be finetune or trainer, got {learner!r}")
        if learner == "trainer":
            from s2r.world_models.dyna import DynaConfig, dyna_finetune

            dcfg = DynaConfig(target_steps=target_steps, target_envs=target_envs, model_updates=model_updates,
                              model_lr=model_lr, imagined_steps=trainer_steps, horizon=trainer_horizon,
                              rounds=trainer_rounds, identify=identify, sim_randomize=sim_randomize,
                              imagine=trainer_imagine, select=trainer_select,
                              checkpoint_every=trainer_checkpoint_every,
                              imagined=ImaginedEnvConfig(penalty=penalty, u_max=u_max, samples=samples),
                              nominal_sim_terms=nominal_sim_terms, eval_envs=max(1, eval_envs), seed=seed)
            dcfg.check()
            overrides = None
            if env_override:
                from s2r.policies.evaluate import load_run

                overrides = parse_env_overrides(env_override, task or load_run(run)[0].task)
            report = dyna_finetune(run, world_model, out, dcfg, env_overrides=overrides, task=task,
                                   progress=(lambda m: typer.echo(m, err=True)) if progress else None)
            if export is not None:
                from s2r.policies.export import export_onnx

                rep = export_onnx(report["checkpoint"], export)
                report["export"], report["export_max_abs_err"] = str(export), rep["max_abs_err_random"]
            report.pop("eval_history")
            typer.echo(json.dumps(report))
            return
        cfg = WMFinetuneConfig(rounds=rounds, real_steps=real_steps, target_envs=target_envs,
                               imagined_envs=imagined_envs, imagined_steps=imagined_steps, utd=utd,
                               real_ratio=real_ratio, batch_size=batch_size, tau=tau, critic_warmup=critic_warmup,
                               lr_actor=lr_actor, nominal_sim_terms=nominal_sim_terms, horizon_start=h0,
                               horizon_end=h1, model_updates=model_updates, model_lr=model_lr,
                               imagined=ImaginedEnvConfig(penalty=penalty, u_max=u_max, samples=samples),
                               eval_envs=eval_envs, seed=seed, identify=identify, sim_randomize=sim_randomize,
                               **({} if anchor_weight is None else {"anchor_weight": anchor_weight}))
        cfg.check()
        overrides = None
        if env_override:
            if task is None:
                from s2r.policies.evaluate import load_run

                task = load_run(run)[0].task
            overrides = parse_env_overrides(env_override, task)
        report = finetune_with_world_model(run, world_model, out, cfg, env_overrides=overrides, task=task,
                                           export=export, progress=show if progress else None)
    except _user_errors() as e:
        _fail(str(e))
    report.pop("rounds")
    typer.echo(json.dumps(report))

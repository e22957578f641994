"""Sim-to-"real" on a shifted robot: world-model finetuning vs model-free SAC finetuning vs none, one run.

    python bench/wm_finetune.py --run RUN [--reference REF] [--shift KEY=VALUE ...] [--sac-budgets 1,5]
                                [--arms none,wm,dyna,sac,trainer | model] [--dyna KEY=VALUE ...]
                                [--imagined KEY=VALUE ...] [--wm KEY=VALUE ...] [--eval-episodes E]
                                [--trainer-budgets 10000,50000]
                                [--world-model WM] [--quick] [--threads N] [--seed S]

RUN: a humanoid-stand training run (`s2r train --task humanoid-stand`). The "real" robot is the same task
shifted (weaker motors, heavier links: SHIFT below, or --shift; the usual randomisation and pushes stay on),
in 5 s episodes. Without --run, --quick trains a tiny run first (a policy that barely stands: a smoke test).
REF: a policy trained on the target (e.g. `s2r train --init-from RUN --env-override ...`), evaluated like
the others; it defines the gap that finetuning should recover: (none - arm) / (none - reference).
  0. a world model of the NOMINAL task (the run's own env) from rollouts of the run's policy with action
     noise: what one would have before meeting the robot;
  1. none: the pretrained deterministic policy on the target, E episodes (same seeds for every arm);
  2. wm:   world_models/finetune.py: R rounds of K deterministic target steps -> model update -> imagined
           rollouts (horizon ramp) -> SAC updates with real_ratio real data;
  2b. dyna: world_models/dyna.py: T deterministic target steps -> model update -> the run's own trainer
           (init_from the run) for I env steps inside the model (--dyna KEY=VALUE: DynaConfig settings;
           rounds=R repeats the cycle with the trainer's current policy on the target, T and I split over R;
           imagine=sim identify=true: in the simulator at the identified physics instead of the model);
  3. sac:  model-free SAC finetuning on the target: the same pretrained agent acts stochastically there
           (as a trainer would), the same updates per target step; evaluated after each budget of
           --sac-budgets (multiples of the wm arm's target steps: 1,5 asks whether world-model finetuning
           needs 5x fewer target steps).
  3b. trainer: model-free finetuning with dyna's learner, on the target itself: the run's own trainer
           (init_from the run, its recipe) explores there; evaluated after each of --trainer-budgets target
           steps, its falls counted. What dyna's target steps and falls compare with.
Per arm: target steps used, falls on the target during finetuning, final fall rate and return over the
E evaluation episodes. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import yaml

from s2r.bench_util import machine_info
from s2r.policies.evaluate import evaluate_policy, load_run, policy_act
from s2r.policies.normalizer import RunningNorm
from s2r.policies.replay import ReplayBuffer
from s2r.sim.gym import make_env
from s2r.sim.overrides import merge_overrides, parse_env_overrides, yaml_value
from s2r.world_models.data import collect_rollouts
from s2r.world_models.dyna import DynaConfig, dyna_finetune
from s2r.world_models.diffusion import DiffusionWorldModel, WorldModelConfig, save_world_model
from s2r.world_models.finetune import NominalSimTerms, WMFinetuneConfig, WorldModelFinetuner, agent_update
from s2r.world_models.imagined_env import ImaginedEnvConfig
from s2r.world_models.sim_prior import SimPrior, SimPriorConfig, sim_prior_extra
from s2r.world_models.train import FitConfig, train_diffusion

SHIFT = ["randomization.motor_strength=0.8", "randomization.mass_scale=1.1"]  # 20 % weaker motors, 10 % heavier
WM_KEYS = ("wm_envs", "wm_steps", "fit_steps", "width", "blocks", "wm_history", "wm_blind", "wm_noise",
           "context_noise", "sim_prior", "members")  # --wm settings


def settings(quick: bool) -> dict:
    if quick:
        return dict(episode_s=1.0, eval_envs=8, wm_envs=8, wm_steps=60, width=128, blocks=2, fit_steps=150,
                    wm_history=2, wm_blind=False, wm_noise=0.5, context_noise=0.0, sim_prior=False, members=1,
                    ft=dict(rounds=3, real_steps=20, target_envs=2, imagined_envs=32, imagined_steps=6, utd=2.0,
                            batch_size=128, horizon_end=5, model_updates=20, eval_envs=0,
                            imagined=ImaginedEnvConfig(samples=2)),
                    dyna=dict(target_steps=40, target_envs=2, model_updates=20, imagined_steps=1200, horizon=10,
                              eval_envs=1, agreement_rollouts=4, imagined=ImaginedEnvConfig(samples=2)))
    return dict(episode_s=5.0, eval_envs=32, wm_envs=16, wm_steps=300, width=256, blocks=3, fit_steps=1500,
                wm_history=2, wm_blind=False, wm_noise=0.5, context_noise=0.0, sim_prior=False, members=1,
                ft=dict(rounds=10, real_steps=50, target_envs=4, imagined_envs=128, imagined_steps=50, utd=4.0,
                        batch_size=256, horizon_end=20, model_updates=100, eval_envs=0,
                        imagined=ImaginedEnvConfig(samples=4)),
                dyna=dict(target_steps=10_000, target_envs=4, model_updates=2000, imagined_steps=100_000, horizon=250,
                          eval_envs=1, imagined=ImaginedEnvConfig(samples=4)))


def tiny_run(out: Path, seed: int) -> Path:
    from s2r.policies.recipes import recipe
    from s2r.policies.trainer import Trainer

    cfg = recipe("humanoid-stand", "sac", "gaussian", num_envs=8, total_steps=2000, learning_starts=1000,
                 batch_size=128, checkpoint_every=2000, eval_every=10**9, eval_episodes=1, progress=False,
                 device="cpu", seed=seed)
    cfg.agent.bf16 = False
    Trainer(cfg, out).train()
    return out


def world_model(run: Path, out: Path, s: dict, seed: int, data_shift: dict) -> tuple[Path, float]:
    """A model of the run's task (its own env, `data_shift` on top: e.g. wider randomisation) from its
    policy with action noise std in [0, s["wm_noise"]] (drawn per env). With s["wm_blind"] the sim-only critic
    terms (randomised physics) read their pretraining mean in the model's data, as they do in finetuning: the
    model must tell the robot from the history, not from terms a robot cannot measure."""
    cfg, agent, norm, ck, _ = load_run(run)
    act = policy_act(agent, norm if cfg.normalize_obs else None, "cpu")
    kw = merge_overrides(merge_overrides(cfg.env_overrides, {"episode_length_s": s["episode_s"]}), data_shift)
    t0 = time.perf_counter()
    state_map = None
    if s["wm_blind"]:
        cnorm = RunningNorm(int(ck["critic_obs_dim"]))
        cnorm.load_state_dict(ck["critic_norm"])
        probe = make_env(cfg.task, 1, seed=seed, **kw)
        try:
            state_map = NominalSimTerms.for_target(probe, probe.spec, cnorm)
        finally:
            probe.close()
    data = collect_rollouts(cfg.task, act, s["wm_envs"], s["wm_steps"], (0.0, s["wm_noise"]), seed, env_kwargs=kw,
                            state_map=state_map)
    extra = {"obs_key": data.obs_key, "layout": json.dumps(data.layout)}
    if s["sim_prior"]:  # the model learns what the nominal simulator misses (world_models/sim_prior.py)
        prior_cfg = SimPriorConfig(task=cfg.task, task_overrides=dict(cfg.env_overrides.get("task_overrides", {})))
        sim = SimPrior(prior_cfg, data.layout)
        try:
            data = data.with_prior(sim)
        finally:
            sim.close()
        extra.update(sim_prior_extra(prior_cfg))
    torch.manual_seed(seed)
    model = DiffusionWorldModel(WorldModelConfig(data.state.shape[1], data.action.shape[1], width=s["width"],
                                                 blocks=s["blocks"], history=s["wm_history"],
                                                 context_noise=s["context_noise"], sim_prior=bool(s["sim_prior"]),
                                                 members=int(s["members"])))
    train_diffusion(model, data, FitConfig(steps=s["fit_steps"], batch_size=256, lr=1e-3, seed=seed))
    save_world_model(out, model, data.spec, extra)
    return out, time.perf_counter() - t0


def evaluate(run_agent, target: dict, task: str, episodes: int, seed: int) -> dict:
    agent, norm = run_agent
    env = make_env(task, episodes, seed=seed, **target)
    try:
        return evaluate_policy(env, policy_act(agent, norm, "cpu"), seed=seed)
    finally:
        env.close()


def model_free(run: Path, target: dict, ft: dict, updates: int, seed: int, budgets: list[int], task: str,
               eval_envs: int, eval_seed: int) -> dict:
    """SAC finetuning directly on the target: stochastic actions there, the wm arm's updates per target step.
    budgets: multiples of the wm arm's target steps; the policy is evaluated after each."""
    cfg, agent, norm, ck, _ = load_run(run)
    agent.train()
    agent.load_optim_state_dict(ck["optim"])  # as the world-model arm: the Adam moments it trained with
    if ft.get("lr_actor") is not None:
        agent.set_actor_lr(ft["lr_actor"])
    agent.cfg.tau = WMFinetuneConfig.tau
    cnorm = RunningNorm(int(ck["critic_obs_dim"]))
    cnorm.load_state_dict(ck["critic_norm"])
    cnorm.freeze()
    n, unit = ft["target_envs"], ft["rounds"] * ft["real_steps"]
    steps = unit * max(budgets)
    updates *= max(budgets)
    env = make_env(cfg.task, n, seed=seed, **target)
    nominal = NominalSimTerms.for_target(env, env.spec, cnorm)  # as the world-model arm's critics see them
    buf = ReplayBuffer(n * steps, n, env.obs_dim, env.critic_obs_dim, env.action_dim, "cpu", gamma=agent.cfg.gamma)
    gen = torch.Generator().manual_seed(seed + 7)
    falls = episodes = done_updates = 0
    at: dict = {}
    obs = env.reset(seed=seed)
    try:
        for i in range(steps):
            a = agent.act(norm.normalize(obs["policy"]))  # a sample: the robot explores
            nxt, r, term, trunc, info = env.step(a)
            d = term | trunc
            real = {k: torch.where(d[:, None], info["final_obs"][k], nxt[k]) for k in nxt} if d.any() else nxt
            s, s_next = obs["critic"], real["critic"]  # [n, S]
            if nominal is not None:
                s, s_next = nominal(s), nominal(s_next)
            buf.add(obs["policy"], s, a, r * cfg.reward_scale, real["policy"], s_next, term, trunc)
            falls, episodes = falls + int(term.sum()), episodes + int(d.sum())
            obs = nxt
            # spread evenly once a batch's worth of data (or a quarter of the run's) is in: the wm arm's total
            while done_updates < updates * (i + 1) // steps and len(buf) >= min(ft["batch_size"], n * unit // 4):
                b = buf.sample(ft["batch_size"], gen)
                for k, nm in (("obs", norm), ("next_obs", norm), ("critic_obs", cnorm), ("next_critic_obs", cnorm)):
                    b[k] = nm.normalize(b[k])
                agent_update(agent, b, critic_only=done_updates < ft.get("critic_warmup", 0))
                done_updates += 1
            if (i + 1) % unit == 0 and (i + 1) // unit in budgets:  # a budget spent: how good is it now?
                at[(i + 1) // unit] = {"target_steps": n * (i + 1), "target_falls": falls, "target_episodes": episodes,
                                       "updates": done_updates,
                                       **evaluate((agent, norm), target, task, eval_envs, eval_seed)}
    finally:
        env.close()
    return at


class FallCounter:
    """The target env, counting its terminated (fallen) and ended episodes while a trainer explores on it."""

    def __init__(self, env):
        self.env, self.falls, self.episodes = env, 0, 0

    def step(self, action):
        out = self.env.step(action)
        self.falls += int(out[2].sum())
        self.episodes += int((out[2] | out[3]).sum())
        return out

    def __getattr__(self, name):
        return getattr(self.env, name)


def model_free_trainer(run: Path, target: dict, budgets: list[int], seed: int, task: str, eval_envs: int,
                       eval_seed: int, out_dir: Path) -> dict:
    """The run's own trainer continued on the target (stochastic actions there), as dyna continues it in the
    model: the same agent, recipe and initialisation, with target steps instead of imagined ones."""
    from s2r.policies.trainer import Trainer

    base = load_run(run)[0]
    made: list[FallCounter] = []

    def make(n: int, env_seed: int) -> FallCounter:
        made.append(FallCounter(make_env(task, n, seed=env_seed, **target)))
        return made[-1]

    tcfg = dataclasses.replace(base, task=task, env_overrides=merge_overrides(base.env_overrides, target),
                               init_from=str(run), total_steps=budgets[0], eval_every=10**12,
                               checkpoint_every=10**12, seed=seed, progress=False)
    trainer = Trainer(tcfg, out_dir, make_env=make)
    at: dict = {}
    for i, b in enumerate(budgets):
        trainer.cfg.total_steps = b
        trainer.train(close_env=i + 1 == len(budgets))
        at[b] = {"target_steps": trainer.env_steps, "target_falls": made[0].falls,
                 "target_episodes": made[0].episodes, "updates": trainer.n_updates,
                 **evaluate((trainer.agent, trainer.obs_norm if trainer.cfg.normalize_obs else None), target, task,
                            eval_envs, eval_seed)}
    return at


def parse_budgets(ap: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """'1,5' -> [1, 5] (sorted, unique); anything else ends the run with a message naming the flag."""
    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
        assert budgets and budgets[0] >= 1
    except (ValueError, AssertionError):
        ap.error(f"{flag} takes comma-separated whole numbers >= 1, got {text!r}")
    return budgets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="humanoid-stand run dir (default with --quick: train one)")
    ap.add_argument("--quick", action="store_true", help="small everything (<= 60 s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--critic-warmup", type=int, default=None, help="critic-only updates first (both arms)")
    ap.add_argument("--lr-actor", type=float, default=None, help="actor learning rate while finetuning (both arms)")
    ap.add_argument("--ft", action="append", default=[], metavar="KEY=VALUE",
                    help="a WMFinetuneConfig setting of the wm arm (repeatable), e.g. utd=8 or horizon_end=50; "
                         "the sac arm follows its target steps and update count")
    ap.add_argument("--dyna", action="append", default=[], metavar="KEY=VALUE",
                    help="a DynaConfig setting of the dyna arm (repeatable), e.g. target_steps=10000, "
                         "imagined_steps=100000, horizon=250, model_updates=2000")
    ap.add_argument("--imagined", action="append", default=[], metavar="KEY=VALUE",
                    help="an ImaginedEnvConfig setting of the wm and dyna arms (repeatable), e.g. penalty=5 (lambda "
                         "in r - lambda u), u_max, samples")
    ap.add_argument("--eval-episodes", type=int, default=None, help="evaluation episodes per arm (default 32)")
    ap.add_argument("--arms", default="none,wm,dyna,sac",
                    help="which of none, wm, dyna, sac, trainer to run (comma-separated); model alone: train the "
                         "world model into --work/wm_nominal.pt and stop (for --world-model in later runs)")
    ap.add_argument("--trainer-budgets", default="10000,50000",
                    help="trainer arm: evaluate after these numbers of target steps (comma-separated)")
    ap.add_argument("--reference", type=Path, default=None,
                    help="a run trained on the target: the gap finetuning should recover")
    ap.add_argument("--shift", action="append", default=None, metavar="KEY=VALUE",
                    help=f"the target robot, as s2r's --env-override (repeatable; default {' '.join(SHIFT)})")
    ap.add_argument("--sac-budgets", default="1", help="model-free arm: evaluate after these multiples of the wm "
                                                        "arm's target steps (e.g. 1,5)")
    ap.add_argument("--wm-data", action="append", default=[], metavar="KEY=VALUE",
                    help="the world model's training data: env overrides on top of the run's (repeatable), e.g. "
                         "randomization.motor_strength=[0.7,1.1] for a model that has seen weaker motors")
    ap.add_argument("--wm", action="append", default=[], metavar="KEY=VALUE",
                    help="world-model setting (repeatable): wm_envs, wm_steps, fit_steps, width, blocks, "
                         "wm_history, wm_blind (true: sim-only critic terms masked in the model's data), wm_noise (the "
                         "largest action noise std of its data), context_noise (WorldModelConfig's), sim_prior "
                         "(true: the model corrects the nominal simulator, world_models/sim_prior.py), members (> 1: "
                         "an ensemble, whose disagreement is imagination's u)")
    ap.add_argument("--world-model", type=Path, default=None,
                    help="use this world model of the nominal task (a file from an earlier run's --work) instead of "
                         "training one; --wm settings then describe nothing")
    ap.add_argument("--work", type=Path, default=Path("/tmp/s2r_bench_wm_finetune"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = settings(args.quick)
    if args.critic_warmup is not None:
        s["ft"]["critic_warmup"] = args.critic_warmup
    if args.lr_actor is not None:
        s["ft"]["lr_actor"] = args.lr_actor
    ft_keys = {f.name for f in dataclasses.fields(WMFinetuneConfig)} - {"imagined", "seed"}
    dyna_keys = {f.name for f in dataclasses.fields(DynaConfig)} - {"imagined", "seed"}
    if args.eval_episodes is not None:
        if args.eval_episodes < 1:
            ap.error(f"--eval-episodes must be >= 1, got {args.eval_episodes}")
        s["eval_envs"] = args.eval_episodes
    imagined: dict = {}
    im_keys = {f.name for f in dataclasses.fields(ImaginedEnvConfig)} - {"horizon", "obs_noise"}
    for flag, items, keys, into in (("--ft", args.ft, ft_keys, s["ft"]), ("--wm", args.wm, WM_KEYS, s),
                                    ("--dyna", args.dyna, dyna_keys, s["dyna"]),
                                    ("--imagined", args.imagined, im_keys, imagined)):
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in keys:
                ap.error(f"{flag} {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(keys))}")
            try:
                into[key] = yaml_value(value)
            except yaml.YAMLError:
                ap.error(f"{flag} {item!r}: the value is not YAML")
    for arm in ("ft", "dyna"):
        s[arm]["imagined"] = dataclasses.replace(s[arm]["imagined"], **imagined)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - {"none", "wm", "dyna", "sac", "trainer", "model"}:
        ap.error(f"--arms takes a comma-separated subset of none, wm, dyna, sac, trainer (or model alone); got "
                 f"{args.arms!r}")
    if "model" in arms and (len(arms) > 1 or args.world_model is not None):
        ap.error("--arms model trains the world model and stops: give it alone, without --world-model")
    if "sac" in arms and "wm" not in arms:
        ap.error("--arms: the sac arm makes as many updates as the wm arm; run it together with wm")
    budgets, trainer_budgets = (parse_budgets(ap, flag, text) for flag, text in (
        ("--sac-budgets", args.sac_budgets), ("--trainer-budgets", args.trainer_budgets)))
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    run = args.run
    if run is None:
        if not args.quick:
            ap.error("--run RUN (a humanoid-stand training run) is needed without --quick")
        run = tiny_run(args.work / f"tiny_run_{int(time.time())}", args.seed)
    task = load_run(run)[0].task
    try:
        shift = parse_env_overrides(args.shift or SHIFT, task)
    except ValueError as e:
        ap.error(str(e).replace("--env-override", "--shift"))
    try:
        data_shift = parse_env_overrides(args.wm_data, task)
    except ValueError as e:
        ap.error(str(e).replace("--env-override", "--wm-data"))
    target = merge_overrides({"episode_length_s": s["episode_s"]}, shift)
    if args.world_model is not None:
        if not args.world_model.is_file():
            ap.error(f"--world-model {args.world_model}: no such file")
        wm_path, t_wm = args.world_model, 0.0
    else:
        wm_path, t_wm = (world_model(run, args.work / "wm_nominal.pt", s, args.seed, data_shift)
                         if {"wm", "dyna", "model"} & set(arms) else (None, 0.0))
    eval_seed = 2000 + args.seed
    out: dict = {}

    if "none" in arms:
        cfg0, agent0, norm0, *_ = load_run(run)
        out["none"] = {"target_steps": 0, "target_falls": 0,
                       **evaluate((agent0, norm0), target, task, s["eval_envs"], eval_seed)}
    if args.reference is not None:
        cfg_r, agent_r, norm_r, ck_r, _ = load_run(args.reference)
        out["reference"] = {"target_steps": int(ck_r["env_steps"]), "target_falls": None,
                            **evaluate((agent_r, norm_r), target, task, s["eval_envs"], eval_seed)}

    if "wm" in arms:
        t = time.perf_counter()
        ft = WorldModelFinetuner(run, wm_path, WMFinetuneConfig(seed=args.seed, **s["ft"]), env_overrides=target)
        try:
            rep = ft.run()
        finally:
            ft.close()
        out["wm"] = {**{k: rep[k] for k in ("target_steps", "target_falls", "target_episodes", "updates",
                                            "imagined_steps", "imagined_rollouts", "halted_nan", "halted_uncertain",
                                            "unsafe", "model_terminated")},
                     **{k: v for k, v in (rep["rounds"][-1] if rep["rounds"] else {}).items()
                        if k.startswith("identif")},  # the estimated sim-only terms (--ft identify=true)
                     **evaluate((ft.agent, ft.obs_norm), target, task, s["eval_envs"], eval_seed),
                     "wall_s": round(time.perf_counter() - t, 1)}

    if "dyna" in arms:
        t = time.perf_counter()
        dcfg = DynaConfig(seed=args.seed, **s["dyna"])
        dyna_dir = args.work / f"dyna_{int(time.time())}"
        rep = dyna_finetune(run, wm_path, dyna_dir, dcfg, env_overrides=target)
        _, agent_d, norm_d, *_ = load_run(rep["checkpoint"])  # the last, or the one the model selected
        out["dyna"] = {**{k: rep[k] for k in ("target_steps", "target_falls", "target_episodes", "imagined_steps",
                                              "updates")}, "imagine": dcfg.imagine, "sim_randomize": dcfg.sim_randomize,
                       **{k: v for k, v in rep.items() if k.startswith("imagined_") and k != "imagined_steps"},
                       **{k: v for k, v in rep["rounds"][-1].items() if k.startswith("identif")},
                       "rounds": [{k: row[k] for k in ("round", "target_steps", "target_falls", "imagined_steps",
                                                       "imagined_fall_rate", "target_fall_rate",
                                                       "eval_terminated_rate", "eval_return_mean") if k in row}
                                  for row in rep["rounds"]],
                       **({"selection": rep["selection"], "selected": rep["checkpoint"]} if rep["selection"] else {}),
                       **evaluate((agent_d, norm_d), target, task, s["eval_envs"], eval_seed),
                       "run": str(dyna_dir), "wall_s": round(time.perf_counter() - t, 1)}

    if "sac" in arms:
        t = time.perf_counter()
        at = model_free(run, target, s["ft"], out["wm"]["updates"], args.seed, budgets, task, s["eval_envs"],
                        eval_seed)
        for b, r in at.items():
            out["sac" if b == 1 else f"sac_x{b}"] = r
        out["sac" if 1 in at else f"sac_x{min(at)}"]["wall_s"] = round(time.perf_counter() - t, 1)

    if "trainer" in arms:
        t = time.perf_counter()
        at = model_free_trainer(run, target, trainer_budgets, args.seed, task, s["eval_envs"], eval_seed,
                                args.work / f"trainer_{int(time.time())}")
        for b, r in at.items():
            out[f"trainer_{b}"] = r
        out[f"trainer_{trainer_budgets[-1]}"]["wall_s"] = round(time.perf_counter() - t, 1)

    if "none" in out and "reference" in out:  # share of the none -> reference gap that each arm closes
        gap = out["none"]["terminated_rate"] - out["reference"]["terminated_rate"]
        rgap = out["reference"]["return_mean"] - out["none"]["return_mean"]
        for r in out.values():
            r["fall_gap_recovered"] = (round((out["none"]["terminated_rate"] - r["terminated_rate"]) / gap, 3)
                                       if gap > 0 else None)
            r["return_gap_recovered"] = (round((r["return_mean"] - out["none"]["return_mean"]) / rgap, 3)
                                         if rgap > 0 else None)
    for name, r in out.items():
        falls = "    -" if r["target_falls"] is None else f"{r['target_falls']:5d}"
        print(f"{name:9s} target steps {r['target_steps']:7d}  falls while finetuning {falls}  "
              f"final fall rate {r['terminated_rate']:.3f}  return {r['return_mean']:.1f}"
              + (f"  gap recovered {r['fall_gap_recovered']}" if r.get("fall_gap_recovered") is not None else ""))
    summary = {"bench": "wm_finetune", "quick": args.quick, "run": str(run), "task": task, "target": target,
               "episode_s": s["episode_s"], "eval_episodes": s["eval_envs"], "world_model_s": round(t_wm, 1),
               "world_model": str(args.world_model) if args.world_model else {k: s[k] for k in WM_KEYS},
               "world_model_file": str(wm_path) if wm_path is not None else None,
               "imagined": {k: v for k, v in dataclasses.asdict(s["dyna"]["imagined"]).items() if k != "obs_noise"},
               "wm_data": data_shift,
               "settings": {k: v for k, v in s["ft"].items() if k != "imagined"},
               "dyna_settings": {k: v for k, v in s["dyna"].items() if k != "imagined"}, "arms": out,
               "wall_s": round(time.perf_counter() - t0, 1), "threads": args.threads, "machine": machine_info()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

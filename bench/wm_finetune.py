"""Sim-to-"real" on a shifted robot: world-model finetuning vs model-free SAC finetuning vs none, one run.

    python bench/wm_finetune.py --run RUN [--quick] [--threads N] [--seed S]

RUN: a humanoid-stand training run (`s2r train --task humanoid-stand`). The "real" robot is the same task
shifted (weaker motors, heavier links: SHIFT below; the usual randomisation and pushes stay on), in 5 s
episodes. Without --run, --quick trains a tiny run first (a policy that barely stands: a smoke test).
  0. a world model of the NOMINAL task (the run's own env) from rollouts of the run's policy with action
     noise: what one would have before meeting the robot;
  1. none: the pretrained deterministic policy on the target, E episodes (same seeds for every arm);
  2. wm:   world_models/finetune.py: R rounds of K deterministic target steps -> model update -> imagined
           rollouts (horizon ramp) -> SAC updates with real_ratio real data;
  3. sac:  model-free SAC finetuning on the target: the same pretrained agent acts stochastically there
           (as a trainer would), the same number of target steps and the same number of updates.
Per arm: target steps used, falls on the target during finetuning, final fall rate and return over the
E evaluation episodes. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from s2r.bench_util import machine_info
from s2r.policies.evaluate import evaluate_policy, load_run, policy_act
from s2r.policies.normalizer import RunningNorm
from s2r.policies.replay import ReplayBuffer
from s2r.sim.gym import make_env
from s2r.sim.overrides import merge_overrides
from s2r.world_models.data import collect_rollouts
from s2r.world_models.diffusion import DiffusionWorldModel, WorldModelConfig, save_world_model
from s2r.world_models.finetune import NominalSimTerms, WMFinetuneConfig, WorldModelFinetuner, agent_update
from s2r.world_models.imagined_env import ImaginedEnvConfig
from s2r.world_models.train import FitConfig, train_diffusion

SHIFT = {"motor_strength": [0.8, 0.8], "mass_scale": [1.1, 1.1]}  # 20 % weaker motors, 10 % heavier links


def settings(quick: bool) -> dict:
    if quick:
        return dict(episode_s=1.0, eval_envs=8, wm_envs=8, wm_steps=60, width=128, blocks=2, fit_steps=150,
                    ft=dict(rounds=3, real_steps=20, target_envs=2, imagined_envs=32, imagined_steps=6, utd=2.0,
                            batch_size=128, horizon_end=5, model_updates=20, eval_envs=0,
                            imagined=ImaginedEnvConfig(samples=2)))
    return dict(episode_s=5.0, eval_envs=32, wm_envs=16, wm_steps=300, width=256, blocks=3, fit_steps=1500,
                ft=dict(rounds=10, real_steps=50, target_envs=4, imagined_envs=128, imagined_steps=50, utd=4.0,
                        batch_size=256, horizon_end=20, model_updates=100, eval_envs=0,
                        imagined=ImaginedEnvConfig(samples=4)))


def tiny_run(out: Path, seed: int) -> Path:
    from s2r.policies.recipes import recipe
    from s2r.policies.trainer import Trainer

    cfg = recipe("humanoid-stand", "sac", "gaussian", num_envs=8, total_steps=2000, learning_starts=1000,
                 batch_size=128, checkpoint_every=2000, eval_every=10**9, eval_episodes=1, progress=False,
                 device="cpu", seed=seed)
    cfg.agent.bf16 = False
    Trainer(cfg, out).train()
    return out


def world_model(run: Path, out: Path, s: dict, seed: int) -> tuple[Path, float]:
    """A model of the run's nominal task from its policy with action noise std in [0, 0.5]."""
    cfg, agent, norm, *_ = load_run(run)
    act = policy_act(agent, norm if cfg.normalize_obs else None, "cpu")
    kw = merge_overrides(cfg.env_overrides, {"episode_length_s": s["episode_s"]})
    t0 = time.perf_counter()
    data = collect_rollouts(cfg.task, act, s["wm_envs"], s["wm_steps"], (0.0, 0.5), seed, env_kwargs=kw)
    torch.manual_seed(seed)
    model = DiffusionWorldModel(WorldModelConfig(data.state.shape[1], data.action.shape[1], width=s["width"],
                                                 blocks=s["blocks"]))
    train_diffusion(model, data, FitConfig(steps=s["fit_steps"], batch_size=256, lr=1e-3, seed=seed))
    save_world_model(out, model, data.spec, {"obs_key": data.obs_key, "layout": json.dumps(data.layout)})
    return out, time.perf_counter() - t0


def evaluate(run_agent, target: dict, task: str, episodes: int, seed: int) -> dict:
    agent, norm = run_agent
    env = make_env(task, episodes, seed=seed, **target)
    try:
        return evaluate_policy(env, policy_act(agent, norm, "cpu"), seed=seed)
    finally:
        env.close()


def model_free(run: Path, target: dict, ft: dict, updates: int, seed: int) -> dict:
    """SAC finetuning directly on the target: stochastic actions there, the same target steps and updates."""
    cfg, agent, norm, ck, _ = load_run(run)
    agent.train()
    agent.load_optim_state_dict(ck["optim"])  # as the world-model arm: the Adam moments it trained with
    if ft.get("lr_actor") is not None:
        agent.set_actor_lr(ft["lr_actor"])
    agent.cfg.tau = WMFinetuneConfig.tau
    cnorm = RunningNorm(int(ck["critic_obs_dim"]))
    cnorm.load_state_dict(ck["critic_norm"])
    cnorm.freeze()
    n, steps = ft["target_envs"], ft["rounds"] * ft["real_steps"]
    env = make_env(cfg.task, n, seed=seed, **target)
    nominal = NominalSimTerms.for_target(env, env.spec, cnorm)  # as the world-model arm's critics see them
    buf = ReplayBuffer(n * steps, n, env.obs_dim, env.critic_obs_dim, env.action_dim, "cpu", gamma=agent.cfg.gamma)
    gen = torch.Generator().manual_seed(seed + 7)
    falls = episodes = done_updates = 0
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
            while done_updates < updates * (i + 1) // steps and len(buf) >= min(ft["batch_size"], n * steps // 4):
                b = buf.sample(ft["batch_size"], gen)
                for k, nm in (("obs", norm), ("next_obs", norm), ("critic_obs", cnorm), ("next_critic_obs", cnorm)):
                    b[k] = nm.normalize(b[k])
                agent_update(agent, b, critic_only=done_updates < ft.get("critic_warmup", 0))
                done_updates += 1
    finally:
        env.close()
    return {"agent": (agent, norm), "target_steps": n * steps, "target_falls": falls, "target_episodes": episodes,
            "updates": done_updates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="humanoid-stand run dir (default with --quick: train one)")
    ap.add_argument("--quick", action="store_true", help="small everything (<= 60 s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--critic-warmup", type=int, default=None, help="critic-only updates first (both arms)")
    ap.add_argument("--lr-actor", type=float, default=None, help="actor learning rate while finetuning (both arms)")
    ap.add_argument("--arms", default="none,wm,sac", help="which of none, wm, sac to run (comma-separated)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/s2r_bench_wm_finetune"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = settings(args.quick)
    if args.critic_warmup is not None:
        s["ft"]["critic_warmup"] = args.critic_warmup
    if args.lr_actor is not None:
        s["ft"]["lr_actor"] = args.lr_actor
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - {"none", "wm", "sac"}:
        ap.error(f"--arms takes a comma-separated subset of none, wm, sac; got {args.arms!r}")
    if "sac" in arms and "wm" not in arms:
        ap.error("--arms: the sac arm makes as many updates as the wm arm; run it together with wm")
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    run = args.run
    if run is None:
        if not args.quick:
            ap.error("--run RUN (a humanoid-stand training run) is needed without --quick")
        run = tiny_run(args.work / f"tiny_run_{int(time.time())}", args.seed)
    task = load_run(run)[0].task
    target = {"episode_length_s": s["episode_s"], "task_overrides": {"randomization": SHIFT}}
    wm_path, t_wm = world_model(run, args.work / "wm_nominal.pt", s, args.seed) if "wm" in arms else (None, 0.0)
    eval_seed = 2000 + args.seed
    out: dict = {}

    if "none" in arms:
        cfg0, agent0, norm0, *_ = load_run(run)
        out["none"] = {"target_steps": 0, "target_falls": 0,
                       **evaluate((agent0, norm0), target, task, s["eval_envs"], eval_seed)}

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
                     **evaluate((ft.agent, ft.obs_norm), target, task, s["eval_envs"], eval_seed),
                     "wall_s": round(time.perf_counter() - t, 1)}

    if "sac" in arms:
        t = time.perf_counter()
        mf = model_free(run, target, s["ft"], out["wm"]["updates"], args.seed)
        out["sac"] = {**{k: v for k, v in mf.items() if k != "agent"},
                      **evaluate(mf["agent"], target, task, s["eval_envs"], eval_seed),
                      "wall_s": round(time.perf_counter() - t, 1)}

    for name, r in out.items():
        print(f"{name:5s} target steps {r['target_steps']:5d}  falls while finetuning {r['target_falls']:3d}  "
              f"final fall rate {r['terminated_rate']:.3f}  return {r['return_mean']:.1f}")
    summary = {"bench": "wm_finetune", "quick": args.quick, "run": str(run), "task": task, "shift": SHIFT,
               "episode_s": s["episode_s"], "eval_episodes": s["eval_envs"], "world_model_s": round(t_wm, 1),
               "settings": {k: v for k, v in s["ft"].items() if k != "imagined"}, "arms": out,
               "wall_s": round(time.perf_counter() - t0, 1), "threads": args.threads, "machine": machine_info()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

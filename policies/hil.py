"""What learns from operator corrections: RLPD-style SAC / DSAC-T over two replay buffers.

HIL-SERL's learner (../shared/ALGORITHMS.md): every transition the robot produced goes to the online
buffer; transitions in which the operator acted (stored with the executed, i.e. the operator's,
action) also go to the demonstration buffer, together with any teleoperated demonstrations. Each
gradient batch is `demo_fraction` demonstrations and the rest online data, so a handful of
corrections weigh as much as hours of the policy's own driving. LayerNorm critics and a low
initial temperature (1e-2; 1.0 drowns the corrections in entropy) are the settings that make it work.

    start: a trained run (s2r train) -> actor, obs normaliser (frozen: it is inside the exported graph)
    add(transitions, intervened) -> online buffer (+ demo buffer where intervened)
    update(n) -> n critic updates on mixed batches (actor every `critic_actor_ratio`, after warm-up)
    save(dir) -> a run directory (config.yaml + checkpoints/) that `s2r export` and `s2r eval` read

The critics see the policy observation, not the simulator's privileged one: on a robot there is no
privileged state, and the learner must work the same on recordings and in simulation. A pretrained
run whose critics took privileged input therefore starts with fresh critics; `critic_warmup`
updates train them before the actor moves, so the pretrained actor is not dragged by random critics.

Shapes: B batch, O obs_dim, A action_dim, k transitions added at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from s2r.io import atomic_write_text
from s2r.policies.algorithms import OffPolicyAgent, make_agent
from s2r.policies.checkpoint import (SPEC_HASH_KEY, SPEC_KEY, SPEC_SOURCE_KEY, CheckpointError, embedded_spec,
                                     latest_checkpoint, load_checkpoint, prune_checkpoints, rng_state,
                                     save_checkpoint)
from s2r.policies.normalizer import RunningNorm
from s2r.policies.replay import TransitionBuffer
from s2r.policies.trainer import TrainConfig, config_from_dict, config_to_dict


@dataclass
class HILConfig:
    """RLPD / HIL-SERL settings (authors' defaults where they give one)."""

    batch_size: int = 256
    demo_fraction: float = 0.5  # share of each batch drawn from the demonstration buffer (once it has data)
    utd: float = 1.0  # critic updates per transition added (update-to-data ratio)
    critic_actor_ratio: int = 2  # critic updates per actor / temperature / target update
    critic_warmup: int = 500  # critic-only updates before the actor moves (fresh critics)
    learning_starts: int = 256  # online transitions before the first update
    init_alpha: float = 1e-2
    target_entropy_scale: float = 0.5  # target entropy -|A| * scale (HIL-SERL: -|A|/2)
    layer_norm: bool = True  # LayerNorm in the critics
    critic_hidden: tuple[int, ...] | None = (256, 256)  # fresh critics' widths (HIL-SERL: 256x256); None: the run's
    bc_weight: float = 0.0  # Q-filtered BC on the demonstration half (losses.q_filtered_bc_loss); 0: pure RLPD
    gamma: float | None = None  # None: the pretrained run's
    lr: float | None = None  # actor and critic learning rate; None: the pretrained run's
    online_capacity: int = 200_000
    demo_capacity: int = 200_000
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the first setting that cannot work."""
        for name in ("batch_size", "critic_actor_ratio", "online_capacity", "demo_capacity"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HIL setting {name} must be a whole number >= 1, got {v!r}")
        for name in ("critic_warmup", "learning_starts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"HIL setting {name} must be a whole number >= 0, got {v!r}")
        if not 0.0 <= self.demo_fraction <= 1.0:
            raise ValueError(f"HIL setting demo_fraction must be in [0, 1], got {self.demo_fraction}")
        if not (math.isfinite(self.utd) and self.utd >= 0):
            raise ValueError(f"HIL setting utd must be a finite number >= 0, got {self.utd}")
        if not (math.isfinite(self.bc_weight) and self.bc_weight >= 0):
            raise ValueError(f"HIL setting bc_weight must be a finite number >= 0, got {self.bc_weight}")
        if not (math.isfinite(self.init_alpha) and self.init_alpha > 0):
            raise ValueError(f"HIL setting init_alpha must be > 0, got {self.init_alpha}")


class RLPDLearner:
    """A pretrained actor, fresh (or reused) critics and two buffers; see the module docstring."""

    def __init__(self, base: TrainConfig, ck: dict, ckpt_path: Path, cfg: HILConfig, device: str = "cpu"):
        cfg.check()
        self.cfg, self.device = cfg, torch.device(device)
        self.obs_dim, self.act_dim = int(ck["obs_dim"]), int(ck["action_dim"])
        self.spec = embedded_spec(ck, ckpt_path) if ck.get(SPEC_KEY) is not None else None
        self.spec_hash = ck.get(SPEC_HASH_KEY) or ""
        self.source = f"{ckpt_path.parent.parent.name}@{int(ck['env_steps'])}"
        agent_cfg = dataclasses.replace(
            base.agent, init_alpha=cfg.init_alpha, policy_delay=cfg.critic_actor_ratio, layer_norm=cfg.layer_norm,
            target_entropy=None, target_entropy_scale=cfg.target_entropy_scale, compile=False, bf16=False,
            critic_hidden=tuple(cfg.critic_hidden) if cfg.critic_hidden else base.agent.critic_hidden,
            bc_weight=cfg.bc_weight,
            gamma=cfg.gamma if cfg.gamma is not None else base.agent.gamma,
            lr_actor=cfg.lr or base.agent.lr_actor, lr_critic=cfg.lr or base.agent.lr_critic)
        self.base = dataclasses.replace(base, agent=agent_cfg, device=str(self.device), normalize_obs=True)
        torch.manual_seed(cfg.seed)
        self.agent: OffPolicyAgent = make_agent(agent_cfg, self.obs_dim, self.obs_dim, self.act_dim, self.device)
        # the actor (and, DSAC-T, its target) from the pretrained run; critics only where they fit
        actor_sd = {k[len("actor."):]: v for k, v in ck["agent"].items() if k.startswith("actor.")}
        self.agent.actor.load_state_dict(actor_sd)
        if "optim" in ck:  # the Adam moments the actor trained with: fresh ones take lr-sized steps at first
            self.agent.load_optim_state_dict(ck["optim"], parts=("actor",))
            self.agent.set_actor_lr(agent_cfg.lr_actor)
        if hasattr(self.agent, "actor_target"):
            self.agent.actor_target.load_state_dict(actor_sd)
        self.reused_critics = self._try_load_critics(ck, base)
        self.obs_norm = RunningNorm(self.obs_dim, self.device)
        self.obs_norm.load_state_dict(ck["obs_norm"])
        self.obs_norm.freeze()  # part of the exported graph: the robot normalises with these numbers
        self.online = TransitionBuffer(cfg.online_capacity, self.obs_dim, self.act_dim, self.device)
        self.demo = TransitionBuffer(cfg.demo_capacity, self.obs_dim, self.act_dim, self.device)
        self.gen = torch.Generator().manual_seed(cfg.seed + 7)
        self.n_updates = 0
        self.transitions_seen = 0
        self._debt = 0.0

    @classmethod
    def from_run(cls, run: str | Path, cfg: HILConfig | None = None, device: str = "cpu") -> RLPDLearner:
        """Start from a run directory or checkpoint file (s2r train, or an earlier finetune)."""
        run = Path(run)
        path = run if run.is_file() else latest_checkpoint(run)
        if path is None:
            raise CheckpointError(f"no valid checkpoint in {run / 'checkpoints'} (is {run} a run directory?)")
        ck = load_checkpoint(path, map_location=device)
        if not isinstance(ck.get("config"), dict):
            raise CheckpointError(f"{path} has no training config inside (saved by an older s2r); "
                                  f"continue the run with s2r train --resume to re-save it")
        return cls(config_from_dict(ck["config"]), ck, path, cfg or HILConfig(), device)

    def _try_load_critics(self, ck: dict, base: TrainConfig) -> bool:
        """Reuse the pretrained critics when they took the same input, shape and reward units; else keep fresh ones
        (a run trained with reward_norm has values in units of its return std, not of the rewards learned here)."""
        if (int(ck["critic_obs_dim"]) != self.obs_dim or base.agent.layer_norm != self.cfg.layer_norm
                or base.reward_norm):
            return False
        sd = {k[len("critic."):]: v for k, v in ck["agent"].items() if k.startswith("critic.")}
        try:
            self.agent.critic.load_state_dict(sd)
        except RuntimeError:
            return False
        self.agent.critic_target.load_state_dict(self.agent.critic.state_dict())
        return True

    # ---- data ------------------------------------------------------------------------------
    def add(self, obs, action, reward, next_obs, done, intervened) -> None:
        """k transitions: obs, next_obs [k, O]; action [k, A] (executed); reward, done, intervened [k].
        done means terminated (no bootstrap); a time-limit cut is not done."""
        t = {k: torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v)
             for k, v in dict(obs=obs, action=action, reward=reward, next_obs=next_obs, done=done).items()}
        self.online.add(**t)
        mask = torch.as_tensor(np.asarray(intervened) if not isinstance(intervened, Tensor) else intervened,
                               dtype=torch.bool).reshape(-1)
        if mask.any():
            self.demo.add(**{k: v[mask] for k, v in t.items()})
        self.transitions_seen += int(mask.numel())
        self._debt += self.cfg.utd * int(mask.numel())

    def add_demos(self, obs, action, reward, next_obs, done) -> None:
        """Teleoperated demonstrations [k, ...]: demonstration buffer only."""
        self.demo.add(obs=torch.as_tensor(obs), action=torch.as_tensor(action), reward=torch.as_tensor(reward),
                      next_obs=torch.as_tensor(next_obs), done=torch.as_tensor(done))

    # ---- learning --------------------------------------------------------------------------
    def sample(self) -> dict[str, Tensor]:
        """One mixed batch: round(B * demo_fraction) demonstrations (when there are any), the rest online."""
        B = self.cfg.batch_size
        n_demo = int(round(B * self.cfg.demo_fraction)) if len(self.demo) else 0
        if not len(self.online):
            n_demo = B
        parts = []
        if n_demo:
            parts.append(self.demo.sample(n_demo, self.gen))
        if B - n_demo:
            parts.append(self.online.sample(B - n_demo, self.gen))
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # [B, ...]
        obs, next_obs = self.obs_norm.normalize(batch["obs"]), self.obs_norm.normalize(batch["next_obs"])
        demo = torch.arange(B, device=obs.device) < n_demo  # [B] the first n_demo rows are demonstrations
        return {"obs": obs, "critic_obs": obs, "next_obs": next_obs, "next_critic_obs": next_obs,
                "action": batch["action"], "reward": batch["reward"], "done": batch["done"],
                "discount": torch.full_like(batch["reward"], self.agent.cfg.gamma), "demo": demo}

    @property
    def ready(self) -> bool:
        return len(self.online) + len(self.demo) >= max(self.cfg.learning_starts, 1)

    def update(self, n: int | None = None) -> dict:
        """n gradient updates (None: the updates owed by `utd` for the transitions added so far)."""
        if n is None:
            n = int(self._debt)
            self._debt -= n
        stats: dict = {}
        if not self.ready:
            return stats
        for _ in range(n):
            batch = self.sample()
            if self.n_updates < self.cfg.critic_warmup:
                stats = self._critic_only(batch)
            else:
                stats = self.agent.update(batch)
            self.n_updates += 1
            for k, v in stats.items():
                if isinstance(v, Tensor) and not torch.isfinite(v).all():
                    raise FloatingPointError(f"non-finite {k} at HIL update {self.n_updates}; nothing is saved "
                                             f"from this update on (the last saved checkpoint stays valid)")
        return stats

    def _critic_only(self, batch: dict[str, Tensor]) -> dict:
        """One critic update with the actor frozen (warm-up of fresh critics): policy_delay pushed out."""
        delay = self.agent.cfg.policy_delay
        self.agent.cfg.policy_delay = 1 << 62
        try:
            return self.agent.update(batch)
        finally:
            self.agent.cfg.policy_delay = delay

    @torch.no_grad()
    def act(self, obs, deterministic: bool = True) -> np.ndarray:
        """obs [k, O] raw -> action [k, A] (numpy), as the exported policy would compute it."""
        o = self.obs_norm.normalize(torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device))
        return self.agent.act(o, deterministic=deterministic).cpu().numpy()

    # ---- output ----------------------------------------------------------------------------
    def payload(self) -> dict:
        """A checkpoint in the trainer's format (s2r export / s2r eval read it)."""
        spec = self.spec
        return {
            "format": "s2r-train-v1", "task": self.base.task,
            SPEC_HASH_KEY: self.spec_hash, SPEC_KEY: json.dumps(spec.to_dict()) if spec is not None else None,
            SPEC_SOURCE_KEY: spec.source if spec is not None else None,
            "algo": self.base.algo, "policy": self.base.policy, "config": config_to_dict(self.base),
            "env_steps": self.transitions_seen, "n_updates": self.n_updates,
            "agent": self.agent.state_dict(),
            "optim": self.agent.optim_state_dict(),
            "obs_norm": self.obs_norm.state_dict(), "critic_norm": self.obs_norm.state_dict(),
            "rng": rng_state(), "gen": self.gen.get_state(), "eval_history": "[]",
            "obs_dim": self.obs_dim, "critic_obs_dim": self.obs_dim, "action_dim": self.act_dim,
            "hil": json.dumps({"source": self.source, "config": dataclasses.asdict(self.cfg),
                               "online": len(self.online), "demo": len(self.demo),
                               "reused_critics": self.reused_critics}),
        }

    def save(self, run_dir: str | Path, keep: int = 3) -> Path:
        """Write run_dir/config.yaml and checkpoints/ckpt_<updates>.pt atomically; -> the checkpoint."""
        run_dir = Path(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(self.base), sort_keys=False))
        path = run_dir / "checkpoints" / f"ckpt_{self.n_updates:09d}.pt"
        save_checkpoint(path, self.payload())
        prune_checkpoints(run_dir, keep=keep)
        return path

    def export(self, run_dir: str | Path, onnx_path: str | Path) -> dict:
        """save(run_dir), then the verified ONNX export of that checkpoint (policies/export.py)."""
        from s2r.policies.export import export_onnx

        return export_onnx(self.save(run_dir), onnx_path)


def bc_update(learner: RLPDLearner, n: int) -> dict:
    """HG-DAgger's learner, the baseline: n behaviour-cloning steps of the actor on the demonstration
    (intervention) buffer only, MSE between the deterministic action and the operator's."""
    if not len(learner.demo):
        return {}
    actor, opt = learner.agent.actor, learner.agent.actor_opt
    loss = torch.zeros(())
    for _ in range(n):
        b = learner.demo.sample(learner.cfg.batch_size, learner.gen)
        pred = actor.deterministic(learner.obs_norm.normalize(b["obs"]))  # [B, A] in (-1, 1)
        loss = (pred - b["action"].clamp(-1, 1)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        learner.n_updates += 1
    return {"bc_loss": loss.detach()}

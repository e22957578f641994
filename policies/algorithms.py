"""What learns: SAC and DSAC-T over a Gaussian or PMOE policy head.

An algorithm owns its networks, target networks, optimisers and temperature,
and turns one sampled batch into one gradient update (`update`). It never
touches the environment (the trainer does) and never normalises observations
(the trainer hands it normalised ones). Losses live in policies/losses.py, one
function each; this file only wires them: read `SAC.update` and
`DSACT.update` top to bottom.

Registry: ALGORITHMS = {"sac": SAC, "dsac-t": DSACT}; heads: "gaussian" | "pmoe".
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from s2r.policies.losses import (alpha_loss, dsac_t_actor_loss, dsac_t_critic_loss, dsac_t_huber_critic_loss,
                                 pmoe_actor_loss, q_filtered_bc_loss, sac_actor_loss, sac_critic_loss, update_b)
from s2r.policies.networks import CriticEnsemble, PMOEActor, TanhGaussianActor, tanh_gaussian_sample

POLICY_HEADS = ("gaussian", "pmoe")
DSAC_CRITIC_LOSSES = {"published": dsac_t_critic_loss, "huber": dsac_t_huber_critic_loss}
_ADAM = {"fused": True}  # one kernel per optimiser step (CPU and CUDA), not one per parameter


@dataclass
class AgentConfig:
    """Hyperparameters of SAC / DSAC-T (defaults per ../shared/ALGORITHMS.md; recipes override)."""

    algo: str = "sac"  # sac | dsac-t
    policy: str = "gaussian"  # gaussian | pmoe
    n_experts: int = 4  # pmoe only
    actor_hidden: tuple[int, ...] = (256, 256)
    critic_hidden: tuple[int, ...] = (256, 256)
    activation: str = "relu"  # DSAC-T's authors use gelu
    layer_norm: bool = False  # LayerNorm in the critics (massively parallel recipes turn it on)
    lr_actor: float = 3e-4
    lr_critic: float = 3e-4
    lr_alpha: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005  # Polyak factor for target networks
    init_alpha: float = 1.0
    target_entropy: float | None = None  # None: -|A| (scaled by target_entropy_scale)
    target_entropy_scale: float = 1.0
    policy_delay: int = 1  # actor, alpha and targets update every `policy_delay` critic updates
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    # DSAC-T
    tau_b: float = 0.005
    dsac_eps: float = 0.1
    # critic loss: "published" (the paper's omega = b^2 + eps) | "huber" (the authors' later code: a weight
    # b^2 / (sigma^2 + eps) clamped to [0.1, 10] and Huber terms, delta 50); see losses.py
    dsac_critic: str = "published"
    # speed options (CUDA)
    bf16: bool = False  # autocast the forward passes to bfloat16
    compile: bool = False  # torch.compile the networks
    grad_clip: float | None = None
    # learning from corrections: Q-filtered BC on batch rows marked batch["demo"], weighted by
    # bc_weight * mean |Q| so the weight does not depend on the reward scale (0: off, plain SAC)
    bc_weight: float = 0.0


def algo_defaults(algo: str) -> dict:
    """Per-algorithm defaults from the papers / authors' code."""
    if algo == "dsac-t":
        return dict(actor_hidden=(256, 256, 256), critic_hidden=(256, 256, 256), activation="gelu",
                    lr_actor=1e-4, lr_critic=1e-4, lr_alpha=3e-4, policy_delay=2, init_alpha=math.e,
                    log_std_min=-20.0, log_std_max=0.5)
    if algo == "sac":
        return {}
    raise ValueError(f"unknown algorithm '{algo}'; choose one of {sorted(ALGORITHMS)}")


def allreduce_grads(params) -> None:
    """Average gradients over data-parallel ranks (no-op outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i:i + n].view_as(g))
        i += n


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank 0's weights."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def _forget_host_count(agent: "OffPolicyAgent", incompatible_keys) -> None:
    agent._host_updates = None  # a loaded state brings its own n_updates


class OffPolicyAgent(nn.Module):
    """Networks, targets, optimisers and temperature shared by SAC and DSAC-T."""

    distributional = False

    def __init__(self, cfg: AgentConfig, obs_dim: int, critic_obs_dim: int, act_dim: int,
                 device: str | torch.device = "cpu"):
        super().__init__()
        if cfg.policy not in POLICY_HEADS:
            raise ValueError(f"unknown policy head '{cfg.policy}'; choose one of {POLICY_HEADS}")
        self.cfg = cfg
        self.obs_dim, self.critic_obs_dim, self.act_dim = obs_dim, critic_obs_dim, act_dim
        self.device = torch.device(device)
        if cfg.policy == "pmoe":
            self.actor = PMOEActor(obs_dim, act_dim, cfg.actor_hidden, n_experts=cfg.n_experts,
                                   activation=cfg.activation, log_std_min=cfg.log_std_min,
                                   log_std_max=cfg.log_std_max)
        else:
            self.actor = TanhGaussianActor(obs_dim, act_dim, cfg.actor_hidden, activation=cfg.activation,
                                           log_std_min=cfg.log_std_min, log_std_max=cfg.log_std_max)
        self.critic = CriticEnsemble(critic_obs_dim, act_dim, cfg.critic_hidden, n_critics=2,
                                     distributional=self.distributional, layer_norm=cfg.layer_norm,
                                     activation=cfg.activation)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.init_alpha)))
        self.target_entropy = (cfg.target_entropy if cfg.target_entropy is not None
                               else -float(act_dim) * cfg.target_entropy_scale)
        self.to(self.device)
        broadcast_module(self)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr_actor, **_ADAM)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_critic, **_ADAM)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.lr_alpha, **_ADAM)
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long, device=self.device))
        # the same count on the host, for the policy delay: int(self.n_updates) would make every update wait
        # for the GPU to finish the last one. None: read from the buffer once (after a checkpoint is loaded)
        self._host_updates: int | None = None
        self.register_load_state_dict_post_hook(_forget_host_count)
        self._autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16
                          else nullcontext())
        if cfg.compile:
            self.actor = torch.compile(self.actor)
            self.critic = torch.compile(self.critic)

    def _count_update(self) -> int:
        """n_updates + 1, on the device and the host; returns the new count."""
        if self._host_updates is None:
            self._host_updates = int(self.n_updates)
        self.n_updates += 1
        self._host_updates += 1
        return self._host_updates

    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.detach().exp()

    def optim_state_dict(self) -> dict:
        """The three Adam states, for checkpoints: a run that resumes or is finetuned continues with the
        moments it had; fresh moments make the first Adam steps about lr per weight whatever the gradient,
        large enough to undo a trained policy."""
        return {"actor": self.actor_opt.state_dict(), "critic": self.critic_opt.state_dict(),
                "alpha": self.alpha_opt.state_dict()}

    def load_optim_state_dict(self, state: dict, parts: tuple[str, ...] = ("actor", "critic", "alpha")) -> None:
        for part in parts:
            getattr(self, f"{part}_opt").load_state_dict(state[part])

    def set_actor_lr(self, lr: float) -> None:
        """A finetune's actor step size: a few new samples support smaller steps than a large buffer did."""
        for group in self.actor_opt.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        """obs: [N, obs_dim] normalised -> action [N, act_dim] in (-1, 1)."""
        with self._autocast:
            a = self.actor.deterministic(obs) if deterministic else self.actor.sample(obs)[0]
        return a.float()

    def _step(self, opt: torch.optim.Optimizer, loss: Tensor, params) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_grads(params)
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        opt.step()

    @torch.no_grad()
    def _polyak(self, net: nn.Module, target: nn.Module) -> None:
        torch._foreach_lerp_(list(target.parameters()), list(net.parameters()), self.cfg.tau)

    def _actor_and_alpha(self, obs: Tensor, critic_obs: Tensor, q_fn, bc: tuple | None = None) -> dict:
        """Actor (Gaussian or PMOE) and temperature update; q_fn(critic_obs, action) -> [n, ...].
        bc: (demo [B] bool, demo_action [B, A], q_demo [B]) adds the Q-filtered BC term on demo rows."""
        alpha = self.alpha
        # frozen before the forward: autograd records at forward time which weights need gradients,
        # so freezing after it would still spend a backward matmul per critic layer on unused grads
        self.critic.requires_grad_(False)
        try:
            with self._autocast:
                if self.cfg.policy == "pmoe":
                    means, log_stds, router_probs = self.actor(obs)  # one trunk pass: experts and router
                    actions, log_probs = tanh_gaussian_sample(means, log_stds)  # [B, K, A], [B, K]
                    q_all = q_fn(critic_obs.unsqueeze(1), actions).float()  # [n, B, K]
                    a_loss, r_loss, stats, log_prob = pmoe_actor_loss(q_all, log_probs.float(),
                                                                      router_probs.float(), alpha)
                    loss = a_loss + r_loss
                else:
                    action, log_prob = self.actor.sample(obs)
                    q_pi = q_fn(critic_obs, action).float()  # [n, B]
                    loss, stats = (sac_actor_loss if not self.distributional else dsac_t_actor_loss)(
                        q_pi, log_prob.float(), alpha)
                    log_prob = log_prob.detach().float()
                if bc is not None and self.cfg.bc_weight > 0:
                    demo, demo_action, q_demo = bc
                    mean_action = self.actor.deterministic(obs)  # [B, A]
                    with torch.no_grad():
                        q_mean = q_fn(critic_obs, mean_action).float().min(0).values  # [B]
                    b_loss, b_stats = q_filtered_bc_loss(mean_action.float(), demo_action, demo, q_demo, q_mean)
                    loss = loss + self.cfg.bc_weight * q_mean.abs().mean() * b_loss
                    stats.update(b_stats)
            self._step(self.actor_opt, loss, list(self.actor.parameters()))
        finally:
            self.critic.requires_grad_(True)
        t_loss, t_stats = alpha_loss(self.log_alpha, log_prob, self.target_entropy)
        self._step(self.alpha_opt, t_loss, [self.log_alpha])
        return {**stats, **t_stats}


def _bc_rows(batch: dict[str, Tensor], action: Tensor, q_action: Tensor) -> tuple | None:
    """(demo [B] bool, demo action [B, A], its Q [B]) for the BC term, or None without batch["demo"]. The
    demo action is the stored one (an operator's correction) unless the batch brings "demo_action" and
    "q_demo" (a finetune's anchor: the pretrained policy's mean action, q_demo = +inf keeps every row)."""
    if "demo" not in batch:
        return None
    if "demo_action" in batch:
        return batch["demo"], batch["demo_action"], batch["q_demo"]
    return batch["demo"], action, q_action


class SAC(OffPolicyAgent):
    """Soft Actor-Critic: twin critics (fused), tanh-Gaussian or PMOE actor, automatic temperature."""

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        obs, cobs, act = batch["obs"], batch["critic_obs"], batch["action"]  # [B, ...]
        reward, done, discount = batch["reward"], batch["done"], batch["discount"]  # [B]
        alpha = self.alpha
        # critic: y = r + gamma^k (1 - d) (min Q'(s', a') - alpha log pi(a'|s'))
        with torch.no_grad(), self._autocast:
            next_a, next_logp = self.actor.sample(batch["next_obs"])
            next_q = self.critic_target(batch["next_critic_obs"], next_a).float()  # [2, B]
        with self._autocast:
            q = self.critic(cobs, act).float()  # [2, B]
        c_loss, stats = sac_critic_loss(q, reward, done, next_q, next_logp.float(), alpha, discount)
        self._step(self.critic_opt, c_loss, list(self.critic.parameters()))
        # actor, temperature, targets (every policy_delay critic updates)
        if self._count_update() % self.cfg.policy_delay == 0:
            bc = _bc_rows(batch, act, q.detach().min(0).values)
            stats.update(self._actor_and_alpha(obs, cobs, lambda o, a: self.critic(o, a), bc))
            self._polyak(self.critic, self.critic_target)
        stats["q_mean"] = q.detach().mean()
        return stats


class DSACT(OffPolicyAgent):
    """DSAC-T: Gaussian distributional twin critics with the three refinements, target policy,
    delayed actor / temperature / target updates."""

    distributional = True

    def __init__(self, cfg: AgentConfig, obs_dim: int, critic_obs_dim: int, act_dim: int, device="cpu"):
        if cfg.dsac_critic not in DSAC_CRITIC_LOSSES:
            raise ValueError(f"unknown DSAC-T critic loss '{cfg.dsac_critic}' (agent.dsac_critic); "
                             f"choose one of {sorted(DSAC_CRITIC_LOSSES)}")
        super().__init__(cfg, obs_dim, critic_obs_dim, act_dim, device)
        self.critic_loss = DSAC_CRITIC_LOSSES[cfg.dsac_critic]
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.register_buffer("b", torch.full((2,), -1.0, device=self.device))  # <0: set from first batch

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        obs, cobs, act = batch["obs"], batch["critic_obs"], batch["action"]
        reward, done, discount = batch["reward"], batch["done"], batch["discount"]
        alpha = self.alpha
        with torch.no_grad(), self._autocast:
            next_a, next_logp = self.actor_target.sample(batch["next_obs"])  # target policy at s'
            next_mu, next_sigma = self.critic_target(batch["next_critic_obs"], next_a)  # [2, B] each
        with self._autocast:
            mu, sigma = self.critic(cobs, act)
        mu, sigma = mu.float(), sigma.float()
        self.b = update_b(self.b, sigma.detach().mean(-1), self.cfg.tau_b)  # b from this batch's sigma
        c_loss, stats = self.critic_loss(mu, sigma, reward, done, next_mu.float(), next_sigma.float(),
                                         next_logp.float(), alpha, discount, self.b, eps=self.cfg.dsac_eps)
        self._step(self.critic_opt, c_loss, list(self.critic.parameters()))
        if self._count_update() % self.cfg.policy_delay == 0:
            bc = _bc_rows(batch, act, mu.detach().min(0).values)
            stats.update(self._actor_and_alpha(obs, cobs, lambda o, a: self.critic(o, a)[0], bc))
            self._polyak(self.critic, self.critic_target)
            self._polyak(self.actor, self.actor_target)
        stats.update({"q_mean": mu.detach().mean(), "sigma_mean": sigma.detach().mean(),
                      "b": self.b.mean()})
        return stats


ALGORITHMS: dict[str, type[OffPolicyAgent]] = {"sac": SAC, "dsac-t": DSACT}


def make_agent(cfg: AgentConfig, obs_dim: int, critic_obs_dim: int, act_dim: int, device="cpu") -> OffPolicyAgent:
    if cfg.algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm '{cfg.algo}'; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[cfg.algo](cfg, obs_dim, critic_obs_dim, act_dim, device)

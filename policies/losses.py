"""Losses for SAC, DSAC-T and the PMOE policy head: one function per loss, written as the papers' equations.

Pure functions: tensors in, (scalar loss, stats) out. No optimiser steps and no state: the trainer
owns the networks, the target networks, alpha and DSAC-T's running sigma `b`, and decides what
runs under `torch.no_grad()`. Stats are detached tensors (no `.item()`, which would force a GPU
sync every update); the logger converts them.

Sources: SAC (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications");
DSAC-T (Duan et al. 2023, "Distributional Soft Actor-Critic with Three Refinements") and its
authors' code; PMOE (Ren et al. 2021, "Probabilistic Mixture-of-Experts for Efficient Deep RL").

Shapes: n critics, B batch, K experts. `done` is *terminated* only: a time-limit truncation still
bootstraps. `gamma` is a float or a per-sample tensor [B] (gamma^n for n-step returns). `alpha`
may be a float or `log_alpha.exp()`; it is never differentiated here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _sg(x):
    """Stop-gradient for tensors; numbers pass through."""
    return x.detach() if isinstance(x, Tensor) else x


def _check_per_sample(q: Tensor, **per_sample: Tensor) -> None:
    """Per-sample inputs must be [B]: a [B, 1] reward would silently broadcast against [n, B]."""
    for name, x in per_sample.items():
        if x.shape != q.shape[1:]:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [B] = {tuple(q.shape[1:])} "
                             f"to match the critics' [n, B] = {tuple(q.shape)}")


# ---------------------------------------------------------------------------------------------
# SAC
# ---------------------------------------------------------------------------------------------


def sac_critic_loss(q: Tensor, reward: Tensor, done: Tensor, next_q: Tensor, next_log_prob: Tensor,
                    alpha: float | Tensor, gamma: float | Tensor) -> tuple[Tensor, dict]:
    """Soft TD error of every critic against the shared clipped double-Q target.

    y = r + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s')),  a' ~ pi(.|s')
    L = sum_i mean_B (Q_i(s, a) - y)^2
    q: [n, B]; reward, done, next_log_prob: [B]; next_q: [n, B] from the target critics at a'.
    """
    _check_per_sample(q, reward=reward, done=done, next_log_prob=next_log_prob)
    done = done.to(reward.dtype)
    with torch.no_grad():
        y = reward + gamma * (1 - done) * (next_q.min(0).values - _sg(alpha) * next_log_prob)  # [B]
    loss = (q - y).pow(2).mean(-1).sum()
    return loss, {"critic_loss": loss.detach(), "q": q.detach().mean(), "y": y.mean()}


def sac_actor_loss(q_pi: Tensor, log_prob: Tensor, alpha: float | Tensor) -> tuple[Tensor, dict]:
    """L = mean_B (alpha log pi(a|s) - min_i Q_i(s, a)),  a ~ pi(.|s) reparameterised.

    q_pi: [n, B] critics at the fresh action; log_prob: [B].
    """
    loss = (_sg(alpha) * log_prob - q_pi.min(0).values).mean()
    return loss, {"actor_loss": loss.detach(), "entropy": -log_prob.detach().mean()}


def alpha_loss(log_alpha: Tensor, log_prob: Tensor, target_entropy: float) -> tuple[Tensor, dict]:
    """L = -mean_B log_alpha (log pi + H_target)_sg: alpha rises while the entropy is below H_target.

    Written on log alpha (as CleanRL and the DSAC-T code do): same fixed point, alpha stays positive.
    """
    loss = -(log_alpha * (log_prob + target_entropy).detach()).mean()
    return loss, {"alpha_loss": loss.detach(), "alpha": log_alpha.detach().exp()}


# ---------------------------------------------------------------------------------------------
# DSAC-T
# ---------------------------------------------------------------------------------------------


def dsac_t_critic_loss(mu: Tensor, sigma: Tensor, reward: Tensor, done: Tensor, next_mu: Tensor,
                       next_sigma: Tensor, next_log_prob: Tensor, alpha: float | Tensor,
                       gamma: float | Tensor, b: Tensor, eps: float = 0.1, clip: float = 3.0,
                       generator: torch.Generator | None = None,
                       noise: Tensor | None = None) -> tuple[Tensor, dict]:
    """DSAC-T critic loss with its three refinements (the published variant, omega = b^2 + eps).

    mu, sigma: [2, B] the critics' return distributions at (s, a); next_mu, next_sigma: [2, B]
    the target critics at (s', a'), a' ~ target pi(.|s'); next_log_prob: [B].
    b: running mean of sigma (see `update_b`), a scalar tensor or one per critic [2] (the authors'
    code keeps one per critic). noise: the paper's epsilon ~ N(0, 1), [B]; drawn when None.
    eps: the 0.1 in omega and in the denominators; clip: 3, both for the noise and for y_z in b units.

    1. Twin value distribution: q' = min(mu1', mu2'); z' = mu_k' + clip(noise, +-3) sigma_k',
       k the critic with the smaller mean.
    2. Expected value substitution: y_q = r + gamma (1 - d)(q' - alpha log pi') trains mu;
       y_z = r + gamma (1 - d)(z' - alpha log pi') trains sigma, bounded: y_z_b = mu + clamp(y_z - mu, +-3b).
    3. Variance-based gradient adjustment: omega = b^2 + eps and
       L_i = omega mean_B[ -(y_q - mu)_sg / (sigma_sg^2 + eps) mu
                           - ((mu_sg - y_z_b)^2 - sigma_sg^2) / (sigma_sg^3 + eps) sigma ],  L = L_1 + L_2.
    """
    y_q, y_z_b, b = _dsac_t_targets(mu, reward, done, next_mu, next_sigma, next_log_prob, alpha, gamma, b,
                                    clip, generator, noise)
    mu_sg, sigma_sg = mu.detach(), sigma.detach()  # [2, B]
    omega = b.pow(2) + eps  # [] or [2, 1]
    loss_i = omega * (
        -(y_q - mu_sg) / (sigma_sg.pow(2) + eps) * mu
        - ((mu_sg - y_z_b).pow(2) - sigma_sg.pow(2)) / (sigma_sg.pow(3) + eps) * sigma
    ).mean(-1, keepdim=True)  # [2, 1]
    loss = loss_i.sum()
    return loss, _dsac_t_stats(loss, mu_sg, sigma_sg, y_q, omega=omega.mean())


def _dsac_t_targets(mu: Tensor, reward: Tensor, done: Tensor, next_mu: Tensor, next_sigma: Tensor,
                    next_log_prob: Tensor, alpha, gamma, b, clip: float, generator, noise) -> tuple[Tensor, ...]:
    """Refinements 1 and 2, shared by both critic losses: -> y_q [B], y_z_b [2, B], b as [] or [2, 1]."""
    _check_per_sample(mu, reward=reward, done=done, next_log_prob=next_log_prob)
    if b is None:
        raise ValueError("b is unset: call b = update_b(b, sigma.detach().mean(-1)) before the loss "
                         "(the authors' code updates b with the current batch first)")
    done = done.to(reward.dtype)
    b = _sg(torch.as_tensor(b, dtype=mu.dtype, device=mu.device))
    b = b.reshape(-1, 1) if b.ndim == 1 else b  # [] or [2, 1]: broadcasts over [2, B]
    with torch.no_grad():
        k = next_mu.argmin(0, keepdim=True)  # [1, B] the critic with the smaller mean
        q_next = next_mu.gather(0, k).squeeze(0)  # [B] = min(mu1', mu2')
        sigma_next = next_sigma.gather(0, k).squeeze(0)  # [B]
        if noise is None:
            noise = torch.randn(q_next.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        z_next = q_next + noise.clamp(-clip, clip) * sigma_next  # [B]
        y_q = reward + gamma * (1 - done) * (q_next - _sg(alpha) * next_log_prob)  # [B]
        y_z = reward + gamma * (1 - done) * (z_next - _sg(alpha) * next_log_prob)  # [B]
        mu_sg = mu.detach()
        y_z_b = mu_sg + torch.clamp(y_z - mu_sg, -clip * b, clip * b)  # [2, B]
    return y_q, y_z_b, b


def _dsac_t_stats(loss: Tensor, mu_sg: Tensor, sigma_sg: Tensor, y_q: Tensor, **weight: Tensor) -> dict:
    """Both critic losses' stats; sigma_mean [2] is what update_b takes, weight the loss's omega or rho."""
    return {"critic_loss": loss.detach(), "q": mu_sg.mean(), "y_q": y_q.mean(), "sigma_mean": sigma_sg.mean(-1),
            **weight}


def dsac_t_huber_critic_loss(mu: Tensor, sigma: Tensor, reward: Tensor, done: Tensor, next_mu: Tensor,
                             next_sigma: Tensor, next_log_prob: Tensor, alpha: float | Tensor,
                             gamma: float | Tensor, b: Tensor, eps: float = 0.1, clip: float = 3.0,
                             delta: float = 50.0, ratio_range: tuple[float, float] = (0.1, 10.0),
                             generator: torch.Generator | None = None,
                             noise: Tensor | None = None) -> tuple[Tensor, dict]:
    """DSAC-T critic loss as in the authors' later code (DSAC-v2 repository): same targets as
    `dsac_t_critic_loss`, but a per-sample weight and Huber terms in place of omega and squares.

    rho = clamp(b^2 / (sigma_sg^2 + eps), 0.1, 10)       (bounded: the published 1/sigma^3 blows up
                                                           where a critic is very sure)
    H(x, y) = Huber(x - y; delta)                         (0.5 e^2 inside |e| < delta, linear outside)
    L_i = mean_B rho [ H(mu, y_q) + sigma (sigma_sg^2 - H(mu_sg, y_z_b)) / (sigma_sg + eps) ],  L = L_1 + L_2
    so dL/dmu = rho (mu - y_q) (clipped at +-delta rho) and sigma settles where sigma^2 = E[H], i.e. at
    half the squared spread of y_z inside the Huber band (the 0.5 of H; the authors' form).
    Same arguments and stats as `dsac_t_critic_loss` (stats carry "rho" instead of "omega").
    """
    y_q, y_z_b, b = _dsac_t_targets(mu, reward, done, next_mu, next_sigma, next_log_prob, alpha, gamma, b,
                                    clip, generator, noise)
    mu_sg, sigma_sg = mu.detach(), sigma.detach()  # [2, B]
    with torch.no_grad():
        rho = (b.pow(2) / (sigma_sg.pow(2) + eps)).clamp(*ratio_range)  # [2, B]
        h_z = F.huber_loss(mu_sg, y_z_b, delta=delta, reduction="none")  # [2, B]
    h_q = F.huber_loss(mu, y_q.expand_as(mu), delta=delta, reduction="none")  # [2, B], grad to mu only
    loss_i = (rho * (h_q + sigma * (sigma_sg.pow(2) - h_z) / (sigma_sg + eps))).mean(-1)  # [2]
    loss = loss_i.sum()
    return loss, _dsac_t_stats(loss, mu_sg, sigma_sg, y_q, rho=rho.mean())


def update_b(b: Tensor | None, sigma_mean: Tensor, tau_b: float = 0.005) -> Tensor:
    """DSAC-T's running sigma: b <- (1 - tau_b) b + tau_b mean_B(sigma), started at the first batch's mean.

    `b` is None or negative (sigma > 0, so any real b is >= 0) until then; the negative form keeps
    the update branch-free for CUDA graphs. The authors' code updates b with the current batch's
    sigma before computing that batch's loss; pass `sigma.detach().mean(-1)` to do the same
    ([2]: one b per critic), or its mean for a single shared b.
    """
    sigma_mean = sigma_mean.detach()
    if b is None:
        return sigma_mean.clone()
    return torch.where(b < 0, sigma_mean, (1 - tau_b) * b + tau_b * sigma_mean)


def dsac_t_actor_loss(mu_pi: Tensor, log_prob: Tensor, alpha: float | Tensor) -> tuple[Tensor, dict]:
    """L = mean_B (alpha log pi(a|s) - min(mu1, mu2)(s, a)),  a ~ pi(.|s) reparameterised.

    mu_pi: [2, B] the critics' means at the fresh action; log_prob: [B].
    """
    loss = (_sg(alpha) * log_prob - mu_pi.min(0).values).mean()
    return loss, {"actor_loss": loss.detach(), "entropy": -log_prob.detach().mean()}


# ---------------------------------------------------------------------------------------------
# PMOE policy head (plugs into SAC or DSAC-T: q_all is Q or mu)
# ---------------------------------------------------------------------------------------------


def pmoe_actor_loss(q_all: Tensor, log_probs: Tensor, router_probs: Tensor,
                    alpha: float | Tensor) -> tuple[Tensor, Tensor, dict, Tensor]:
    """PMOE's frequency approximation: only the best expert's action is pushed up the critic.

    q_all: [n, B, K] every critic at every expert's reparameterised action a_k;
    log_probs: [B, K] each expert's own log pi_k(a_k|s); router_probs: [B, K].
    Q_k = min_i Q_i(s, a_k); best = argmax_k Q_k;
    actor loss  = mean_B (alpha log pi_best(a_best|s) - Q_best)
    router loss = MSE(one_hot(best), router(s))
    Returns (actor_loss, router_loss, stats, log_prob_best [B] detached, for the temperature loss).
    Their sum can share one optimiser: the router's input is stop-gradient and `best` is an argmax.
    """
    n_experts = q_all.shape[-1]
    q_k = q_all.min(0).values  # [B, K]
    best = q_k.detach().argmax(-1, keepdim=True)  # [B, 1]
    q_best = q_k.gather(-1, best).squeeze(-1)  # [B]
    log_prob_best = log_probs.gather(-1, best).squeeze(-1)  # [B]
    actor_loss = (_sg(alpha) * log_prob_best - q_best).mean()
    one_hot_best = F.one_hot(best.squeeze(-1), n_experts).to(router_probs.dtype)  # [B, K]
    router_loss = F.mse_loss(router_probs, one_hot_best)
    stats = {
        "actor_loss": actor_loss.detach(),
        "router_loss": router_loss.detach(),
        "entropy": -log_prob_best.detach().mean(),
        "best_counts": one_hot_best.sum(0),  # [K] how often each expert was best in this batch
        "expert_usage": router_probs.detach().mean(0),  # [K] the router's mean weight per expert
    }
    return actor_loss, router_loss, stats, log_prob_best.detach()


# ---------------------------------------------------------------------------------------------
# Learning from corrections: Q-filtered behaviour cloning (Nair et al. 2018) on demonstration rows
# ---------------------------------------------------------------------------------------------


def q_filtered_bc_loss(mean_action: Tensor, demo_action: Tensor, demo: Tensor, q_demo: Tensor,
                       q_pi: Tensor) -> tuple[Tensor, dict]:
    """Pull the policy's mean action toward the operator's, only where the critic rates the operator's
    action above the policy's own: corrections teach fast, and a worse correction is not copied.

    L = sum_B [demo & (Q(s, a_demo) > Q(s, pi(s)))] ||mu(s) - a_demo||^2 / max(1, sum_B demo)
    mean_action: [B, A] tanh of the actor's mean (differentiable); demo_action: [B, A];
    demo: [B] bool, the row came from the demonstration buffer; q_demo, q_pi: [B] min over critics.
    """
    keep = (demo & (q_demo > q_pi)).to(mean_action.dtype)  # [B]
    sq = (mean_action - demo_action.clamp(-1, 1)).pow(2).sum(-1)  # [B]
    loss = (keep * sq).sum() / demo.sum().clamp(min=1)
    return loss, {"bc_loss": loss.detach(), "bc_kept": keep.sum() / demo.sum().clamp(min=1)}

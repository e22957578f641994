"""EDM-style conditional diffusion world model over proprioceptive state (Karras et al. 2022; DIAMOND).

Data in: windows of the last k states and actions (world_models/data.py builds them from sim
rollouts, replay buffers or MCAP recordings). Out: samples of the next state, reward and termination,
used by the imagined env (world_models/imagined_env.py), `s2r wm eval` and bench/world_model.py.

What is diffused, per transition, is one vector x0 [D] with D = state_dim + 2:
    x0 = [ (s' - s - delta_mean) / delta_std  |  (r - reward_mean) / reward_std  |  2 done - 1 ]
conditioned on c = [ clip((s_{t-k+1..t} - state_mean) / state_std) | a_{t-k+1..t} ] (a in [-1, 1]).
With a sim prior (WorldModelConfig.sim_prior) the base of the delta is the simulator's next state s_sim' instead
of s, and c also holds clip((s_sim' - s - prior_mean) / prior_std): the model learns what the simulator misses.

EDM (symbols as in ../shared/ALGORITHMS.md):
    c_in = 1/sqrt(sigma^2 + sigma_d^2)      c_skip = sigma_d^2/(sigma^2 + sigma_d^2)
    c_out = sigma sigma_d/sqrt(sigma^2 + sigma_d^2)      c_noise = ln(sigma)/4
    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, c)
    training: sigma ~ exp(N(P_mean, P_std^2)), loss = || F - (x0 - c_skip x_sigma)/c_out ||^2
              (= lambda(sigma) ||D - x0||^2 with EDM's weight lambda = 1/c_out^2)
    sampling: Karras schedule sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, sigma_n = 0;
              Euler or Heun (2nd order, Euler on the last step to sigma = 0) as a fixed loop.
Targets are standardised, so sigma_d = 1 by default (DIAMOND's 0.5 was for images in [-1, 1]).

The model carries its normalisers (fixed mean/std of the training data, as buffers) and is saved with
the robot spec and its hash through policies/checkpoint.py (verified header, atomic write).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2r.control.spec import RobotSpec
from s2r.policies.checkpoint import (SPEC_HASH_KEY, SPEC_KEY, SPEC_SOURCE_KEY, CheckpointError, embedded_spec,
                                     load_checkpoint, save_checkpoint)

FORMAT = "s2r-world-model-v1"
SOLVERS = ("euler", "heun")


class WorldModelError(ValueError):
    """Bad input to a world model (history too short, wrong widths, unknown solver); the message says which."""


@dataclass
class WorldModelConfig:
    state_dim: int
    action_dim: int
    history: int = 2  # k: states and actions the prediction is conditioned on
    width: int = 512  # residual MLP width
    blocks: int = 4  # residual blocks
    emb_dim: int = 64  # Fourier features of c_noise
    sigma_data: float = 1.0  # targets are standardised
    p_mean: float = -1.2  # training sigma ~ exp(N(p_mean, p_std^2)) (EDM)
    p_std: float = 1.2
    sigma_min: float = 0.002  # sampling schedule (DIAMOND: 2e-3 .. 5, rho 7)
    sigma_max: float = 5.0
    rho: float = 7.0
    state_clip: float = 10.0  # normalised conditioning states are clipped to +-this
    # L: in training, Gaussian noise of a level drawn in [0, L] (normalised state units) on the k context states,
    # the level an extra input (0 when imagining), the target the clean transition (GameNGen's noise
    # augmentation): the model learns to step sensibly from states a little off the data, as its own rollouts are
    # after a few steps. 0: off. Measured in docs/WORLD_MODELS.md (episode survival of imagined rollouts).
    context_noise: float = 0.0
    # the model corrects a simulator: its target is s' minus the simulator's next state from the same (s, a)
    # (world_models/sim_prior.py), and it reads the simulator's step (s_sim' - s) as one more input
    sim_prior: bool = False
    # M > 1: M denoisers of their own initialisation and training noise on the same data (a deep ensemble). An
    # imagined step draws once per member from the same starting noise and takes one member's draw per row (MBPO);
    # the members' spread is then what they disagree on (epistemic: high where the data did not pin the residual
    # down), not the sampler's noise, and is the u of MOPO's r - lambda u
    members: int = 1

    @property
    def target_dim(self) -> int:  # normalised delta [state_dim] + reward + done channel
        return self.state_dim + 2

    @property
    def cond_dim(self) -> int:  # k states and actions, + the context-noise level, + the simulator's step
        return (self.history * (self.state_dim + self.action_dim) + (1 if self.context_noise > 0 else 0)
                + (self.state_dim if self.sim_prior else 0))


# ---- EDM math: pure functions, unit-tested against their definitions ---------------------------


def edm_preconditioning(sigma: Tensor, sigma_d: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sigma [B] -> (c_in, c_skip, c_out, c_noise), each [B] (Karras et al. 2022, table 1)."""
    s2, d2 = sigma**2, sigma_d**2
    c_in = 1.0 / torch.sqrt(s2 + d2)
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_d / torch.sqrt(s2 + d2)
    c_noise = torch.log(sigma) / 4.0
    return c_in, c_skip, c_out, c_noise


def edm_loss_weight(sigma: Tensor, sigma_d: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1 / c_out^2: the weight on ||D - x0||^2."""
    return (sigma**2 + sigma_d**2) / (sigma * sigma_d) ** 2


def sample_training_sigma(n: int, p_mean: float, p_std: float, generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> Tensor:
    """sigma [n] ~ exp(N(p_mean, p_std^2)): log-normal training noise levels."""
    return torch.exp(p_mean + p_std * torch.randn(n, generator=generator, device=device))


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """[steps + 1] noise levels, sigma_max ... sigma_min, then 0 (Karras et al. eq. 5)."""
    if not (isinstance(steps, int) and 1 <= steps <= 10):
        raise WorldModelError(f"sampling steps must be a whole number in 1..10, got {steps!r}")
    if steps == 1:
        return torch.tensor([sigma_max, 0.0])
    i = torch.arange(steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + i / (steps - 1) * (lo - hi)) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def edm_sample(denoise, x: Tensor, sigmas: Tensor, solver: str = "euler") -> Tensor:
    """Integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigmas[0] to 0.

    denoise(x [B, D], sigma float) -> D(x) [B, D]; x: the starting noise sigmas[0] * eps [B, D].
    A fixed loop (len(sigmas) - 1 steps), so it unrolls in an export. Heun adds a corrector on every
    step but the last (to sigma = 0, where the slope is undefined), as in EDM's Algorithm 1.
    Evaluations: Euler n, Heun 2n - 1."""
    if solver not in SOLVERS:
        raise WorldModelError(f"unknown solver '{solver}'; choose one of {SOLVERS}")
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoise(x, s)) / s  # slope [B, D]
        x_next = x + (s_next - s) * d
        if solver == "heun" and s_next > 0:
            d_next = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
    return x


# ---- the denoiser network -------------------------------------------------------------------------


class FourierEmbedding(nn.Module):
    """c_noise [B] -> [B, dim]: cos/sin at log-spaced fixed frequencies (no RNG: the same in every build)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), dim // 2)), persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        a = c_noise[:, None] * self.freqs[None, :]  # [B, dim/2]
        return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


class ResidualBlock(nn.Module):
    """h + W2 silu(W1 LN(h) * (1 + scale) + shift), (scale, shift) from the noise embedding."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.fc2 = nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)  # starts as the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.film(emb).chunk(2, dim=-1)  # [B, width] each
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) * (1 + scale) + shift))


class Denoiser(nn.Module):
    """F(c_in x [B, D], c_noise [B], cond [B, C]) -> [B, D]: residual MLP with a noise-level embedding."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.fourier = FourierEmbedding(cfg.emb_dim)
        self.emb = nn.Sequential(nn.Linear(cfg.emb_dim, cfg.emb_dim), nn.SiLU(), nn.Linear(cfg.emb_dim, cfg.emb_dim))
        self.inp = nn.Linear(cfg.target_dim + cfg.cond_dim, cfg.width)
        self.blocks = nn.ModuleList(ResidualBlock(cfg.width, cfg.emb_dim) for _ in range(cfg.blocks))
        self.out_norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, cfg.target_dim)

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: Tensor) -> Tensor:
        emb = F.silu(self.emb(self.fourier(c_noise)))  # [B, emb_dim]
        h = self.inp(torch.cat([x_in, cond], dim=-1))  # [B, width]
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))


# ---- the world model ------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One sampled step for a batch; uncertainty is None unless several samples (or members) were drawn."""

    next_state: Tensor  # [B, S]
    reward: Tensor  # [B]
    terminated: Tensor  # [B] bool
    uncertainty: Tensor | None = None  # [B]: mean over state dims of the std of the normalised delta draws


class TransitionModel(nn.Module):
    """The data side every s2r world model shares (this one and the ensemble baseline): fixed normalisers
    of the training data, the conditioning vector of k states and actions, the normalised target and
    its decoding. cfg needs state_dim, action_dim, history and state_clip."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        S = cfg.state_dim
        for name, dim in (("state_mean", S), ("state_std", S), ("delta_mean", S), ("delta_std", S),
                          ("reward_mean", 1), ("reward_std", 1), ("state_lo", S), ("state_hi", S)):
            self.register_buffer(name, torch.zeros(dim) if "mean" in name or "lo" in name else torch.ones(dim))
        self.sim_prior = bool(getattr(cfg, "sim_prior", False))
        if self.sim_prior:  # statistics of the simulator's step s_sim' - s, for its conditioning input
            self.register_buffer("prior_mean", torch.zeros(S))
            self.register_buffer("prior_std", torch.ones(S))

    # ---- normalisation ----------------------------------------------------------------------
    def fit_normalizers(self, state: Tensor, next_state: Tensor, reward: Tensor, prior: Tensor | None = None) -> None:
        """Fixed statistics of the training data: state [N, S], next_state [N, S], reward [N] (and, for a sim-prior
        model, the simulator's next states prior [N, S]: the delta is then next_state - prior).

        Stds are floored (1e-3 states, 1e-6 deltas) so a constant dimension never divides by zero;
        state_lo/hi [S] is the data's range, which the imagined env clamps to."""
        self._check_prior(prior)
        delta = next_state - (prior if prior is not None else state)
        if prior is not None:
            step = prior - state
            self.prior_mean.copy_(step.mean(0))
            self.prior_std.copy_(step.std(0).clamp_min(1e-6))
        self.state_mean.copy_(state.mean(0))
        self.state_std.copy_(state.std(0).clamp_min(1e-3))
        self.delta_mean.copy_(delta.mean(0))
        self.delta_std.copy_(delta.std(0).clamp_min(1e-6))
        self.reward_mean.copy_(reward.mean().reshape(1))
        self.reward_std.copy_(reward.std().clamp_min(1e-6).reshape(1))
        both = torch.cat([state, next_state])
        self.state_lo.copy_(both.min(0).values)
        self.state_hi.copy_(both.max(0).values)

    def _check_prior(self, prior: Tensor | None) -> None:
        if self.sim_prior and prior is None:
            raise WorldModelError("this world model corrects a simulator (sim_prior): give the simulator's next "
                                  "states (world_models/sim_prior.py SimPrior.predict)")
        if not self.sim_prior and prior is not None:
            raise WorldModelError("this world model was trained without a sim prior; it takes no simulator states")

    def condition(self, states: Tensor, actions: Tensor, noise_level: Tensor | None = None,
                  prior: Tensor | None = None) -> Tensor:
        """states [B, j, S], actions [B, j, A] (oldest first, actions[:, -1] taken in states[:, -1]) -> cond [B, C].

        Uses the last k; refuses fewer (a model trained on k steps of context has no meaning with less). A model
        trained with context noise also reads the level [B] of the noise on `states` (None: clean, 0); a sim-prior
        model reads the simulator's next state prior [B, S] (from the clean last state and action)."""
        k, S, A = self.cfg.history, self.cfg.state_dim, self.cfg.action_dim
        if states.dim() != 3 or actions.dim() != 3:
            raise WorldModelError(f"states must be [batch, history, {S}] and actions [batch, history, {A}], got "
                                  f"{tuple(states.shape)} and {tuple(actions.shape)}")
        if states.shape[-1] != S or actions.shape[-1] != A:
            raise WorldModelError(f"the model was trained on states of width {S} and actions of width {A}, got "
                                  f"{states.shape[-1]} and {actions.shape[-1]}: another observation layout or robot")
        if states.shape[1] < k or actions.shape[1] < k:
            raise WorldModelError(f"history too short: the model conditions on the last {k} states and actions, "
                                  f"got {states.shape[1]} states and {actions.shape[1]} actions")
        s = ((states[:, -k:] - self.state_mean) / self.state_std).clamp(-self.cfg.state_clip, self.cfg.state_clip)
        parts = [s.flatten(1), actions[:, -k:].clamp(-1, 1).flatten(1)]
        if getattr(self.cfg, "context_noise", 0.0) > 0:
            parts.append(noise_level[:, None] if noise_level is not None else s.new_zeros(s.shape[0], 1))
        self._check_prior(prior)
        if prior is not None:
            if prior.shape != states[:, -1].shape:
                raise WorldModelError(f"sim prior states must be [batch, {S}], got {tuple(prior.shape)}")
            step = (prior - states[:, -1] - self.prior_mean) / self.prior_std
            parts.append(step.clamp(-self.cfg.state_clip, self.cfg.state_clip))
        return torch.cat(parts, dim=-1)

    def target(self, state: Tensor, next_state: Tensor, reward: Tensor, terminated: Tensor,
               prior: Tensor | None = None) -> Tensor:
        """(s [B, S], s' [B, S], r [B], terminated [B]) -> x0 [B, S + 2] (normalised delta | reward | 2 done - 1);
        the delta from the simulator's next state prior [B, S] where given, else from s."""
        delta = (next_state - (prior if prior is not None else state) - self.delta_mean) / self.delta_std
        r = (reward[:, None] - self.reward_mean) / self.reward_std
        return torch.cat([delta, r, terminated.float()[:, None] * 2 - 1], dim=-1)

    def decode(self, state: Tensor, x0: Tensor, prior: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x0 [B, S + 2] -> (next_state [B, S], reward [B], terminated [B] bool) around the current state [B, S]
        (around the simulator's next state prior [B, S] where given)."""
        S = self.cfg.state_dim
        next_state = (prior if prior is not None else state) + x0[:, :S] * self.delta_std + self.delta_mean
        reward = x0[:, S] * self.reward_std + self.reward_mean
        return next_state, reward, x0[:, S + 1] > 0


class DiffusionWorldModel(TransitionModel):
    """Predicts (s', r, terminated) from the last k states and actions by EDM sampling."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__(cfg)
        if isinstance(cfg.members, bool) or not isinstance(cfg.members, int) or cfg.members < 1:
            raise WorldModelError(f"world model members must be a whole number >= 1, got {cfg.members!r}")
        # one denoiser (files before members existed hold net.*), or a list of them
        self.net = Denoiser(cfg) if cfg.members == 1 else nn.ModuleList(Denoiser(cfg) for _ in range(cfg.members))

    def member_nets(self) -> list[nn.Module]:
        """The denoisers, one per member (train.py steps and clips each one's gradient on its own)."""
        return [self.net] if self.cfg.members == 1 else list(self.net)

    # ---- EDM ---------------------------------------------------------------------------------
    def denoise(self, x: Tensor, sigma: Tensor | float, cond: Tensor, member: int = 0) -> Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, cond); x [B, D], sigma [B] or a float."""
        if not isinstance(sigma, Tensor):
            sigma = torch.full((x.shape[0],), float(sigma), device=x.device)
        c_in, c_skip, c_out, c_noise = edm_preconditioning(sigma, self.cfg.sigma_data)
        net = self.member_nets()[member]
        return c_skip[:, None] * x + c_out[:, None] * net(c_in[:, None] * x, c_noise, cond)

    def loss(self, x0: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """EDM denoising loss: E_sigma,n || F(c_in (x0 + n), c_noise) - (x0 - c_skip (x0 + n)) / c_out ||^2,
        averaged over the members, each with its own sigma and noise draws on the same batch."""
        total = x0.new_zeros(())
        for net in self.member_nets():
            sigma = sample_training_sigma(x0.shape[0], self.cfg.p_mean, self.cfg.p_std, generator, x0.device)  # [B]
            n = torch.randn(x0.shape, generator=generator, device=x0.device) * sigma[:, None]
            x_sigma = x0 + n
            c_in, c_skip, c_out, c_noise = edm_preconditioning(sigma, self.cfg.sigma_data)
            F_x = net(c_in[:, None] * x_sigma, c_noise, cond)  # [B, D]
            F_target = (x0 - c_skip[:, None] * x_sigma) / c_out[:, None]
            total = total + ((F_x - F_target) ** 2).mean()
        return total / self.cfg.members

    def _start(self, cond: Tensor, steps: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """-> (the Karras schedule [steps + 1], the starting noise sigma_max * eps [B, D]) for cond [B, C]."""
        c = self.cfg
        sigmas = karras_sigmas(steps, c.sigma_min, c.sigma_max, c.rho)
        return sigmas, torch.randn(cond.shape[0], c.target_dim, generator=generator, device=cond.device) * sigmas[0]

    @torch.no_grad()
    def sample(self, cond: Tensor, steps: int = 3, solver: str = "euler",
               generator: torch.Generator | None = None, member: int = 0) -> Tensor:
        """cond [B, C] -> x0 samples [B, D] by `steps` Karras-schedule steps from sigma_max."""
        sigmas, x = self._start(cond, steps, generator)
        return edm_sample(lambda x_, s: self.denoise(x_, s, cond, member), x, sigmas, solver)

    @torch.no_grad()
    def sample_members(self, cond: Tensor, steps: int = 3, solver: str = "euler",
                       generator: torch.Generator | None = None) -> Tensor:
        """cond [B, C] -> x0 [M, B, D]: every member's draw from the same starting noise (the sampler is a
        deterministic ODE from there), so the draws differ only where the members do."""
        sigmas, x = self._start(cond, steps, generator)
        return torch.stack([edm_sample(lambda x_, s, m=m: self.denoise(x_, s, cond, m), x, sigmas, solver)
                            for m in range(self.cfg.members)])

    @torch.no_grad()
    def predict(self, states: Tensor, actions: Tensor, steps: int = 3, solver: str = "euler", samples: int = 1,
                generator: torch.Generator | None = None, prior: Tensor | None = None,
                mean: bool = False) -> Prediction:
        """One imagined step for states [B, j >= k, S], actions [B, j, A] (and, for a sim-prior model, the
        simulator's next state prior [B, S] from states[:, -1] and actions[:, -1]).

        samples > 1: draw that many, return the first as the prediction and their spread as the
        uncertainty u [B] (mean over dims of the std of the normalised delta, in units of the data's
        delta std: 0 where all samples agree). mean: predict the samples' mean instead of the first, an
        estimate of the expected next state (what an ensemble's mean is to its draws: no sampled noise,
        so lower error per step, but no spread of outcomes for imagination to explore).

        An ensemble (cfg.members > 1) draws once per member from the same noise whatever `samples` says; each row
        steps one member's draw, picked at random (MBPO), or their mean with `mean`, and u is the members'
        spread: their disagreement, not the sampler's noise."""
        if not (isinstance(samples, int) and samples >= 1):
            raise WorldModelError(f"samples must be a whole number >= 1, got {samples!r}")
        cond = self.condition(states, actions, prior=prior)  # [B, C]
        B = cond.shape[0]
        if self.cfg.members > 1:
            x0 = self.sample_members(cond, steps, solver, generator)  # [M, B, D]
            pick = torch.randint(0, self.cfg.members, (B,), generator=generator, device=cond.device)  # [B]
            one = x0.mean(0) if mean else x0[pick, torch.arange(B, device=cond.device)]
            nxt, r, term = self.decode(states[:, -1], one, prior)
            return Prediction(nxt, r, term, x0[:, :, : self.cfg.state_dim].std(0, unbiased=False).mean(-1))
        x0 = self.sample(cond.repeat(samples, 1), steps, solver, generator).reshape(samples, B, -1)
        nxt, r, term = self.decode(states[:, -1], x0.mean(0) if mean else x0[0], prior)
        u = x0[:, :, : self.cfg.state_dim].std(0, unbiased=False).mean(-1) if samples > 1 else None
        return Prediction(nxt, r, term, u)


# ---- files --------------------------------------------------------------------------------------


def save_world_model(path: str | os.PathLike, model: DiffusionWorldModel, spec: RobotSpec | None,
                     extra: dict | None = None) -> None:
    """Verified, atomic checkpoint (policies/checkpoint.py) holding config, weights, normalisers and spec."""
    payload = {"format": FORMAT, "config": asdict(model.cfg), "model": model.state_dict(),
               SPEC_HASH_KEY: spec.hash() if spec is not None else "",
               SPEC_KEY: json.dumps(spec.to_dict()) if spec is not None else None,
               SPEC_SOURCE_KEY: spec.source if spec is not None else None, **(extra or {})}
    save_checkpoint(path, payload)


def load_world_model(path: str | os.PathLike, expected_spec: RobotSpec | None = None,
                     map_location: str | torch.device = "cpu") -> tuple[DiffusionWorldModel, RobotSpec | None, dict]:
    """-> (model in eval mode, its robot spec, the payload). CheckpointError for a corrupt file, a file
    that is not a world model, or one trained for another robot spec than expected_spec."""
    payload = load_checkpoint(path, map_location=map_location, expected_spec=expected_spec)
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is an s2r checkpoint but not a world model (format "
                              f"{payload.get('format')!r}, expected {FORMAT!r}); train one with `s2r wm train`")
    known = {f.name for f in fields(WorldModelConfig)}
    cfg = WorldModelConfig(**{k: v for k, v in payload["config"].items() if k in known})
    model = DiffusionWorldModel(cfg)
    model.load_state_dict(payload["model"])
    model.eval()
    spec = embedded_spec(payload, path)
    return model, spec, payload

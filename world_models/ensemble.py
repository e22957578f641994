"""The baseline the diffusion model is measured against: an MBPO/MOPO probabilistic MLP ensemble.

7 members (4 x 200, SiLU), each predicting a diagonal Gaussian over the normalised [next-state delta,
reward] plus a termination logit, from the same conditioning as the diffusion model (last k states and
actions, TransitionModel's normalisers), so the comparison differs only in the model. Trained with the
Gaussian NLL (MBPO's soft log-variance bounds) on bootstrapped batches; the 5 members with the lowest
validation MSE are the elites. Members run as one batched matmul chain ([E, B, in] x [E, in, out]).

Used by bench/world_model.py; its MOPO uncertainty (max over elites of the predicted std's norm) is
offered next to the diffusion model's sample spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2r.world_models.data import Transitions, windows
from s2r.world_models.diffusion import TransitionModel


@dataclass
class EnsembleConfig:
    state_dim: int
    action_dim: int
    history: int = 2
    members: int = 7
    elites: int = 5
    hidden: int = 200
    layers: int = 4
    state_clip: float = 10.0


class ProbabilisticEnsemble(TransitionModel):
    def __init__(self, cfg: EnsembleConfig):
        super().__init__(cfg)
        E, S = cfg.members, cfg.state_dim
        self.out_dim = S + 1  # Gaussian over [delta, reward]; + 1 termination logit below
        dims = [cfg.history * (S + cfg.action_dim)] + [cfg.hidden] * cfg.layers + [2 * self.out_dim + 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, o in zip(dims[:-1], dims[1:]):
            w = torch.empty(E, i, o)
            for e in range(E):
                nn.init.xavier_uniform_(w[e].T)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(E, 1, o)))
        self.max_logvar = nn.Parameter(torch.full((self.out_dim,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((self.out_dim,), -10.0))
        self.register_buffer("elite_ids", torch.arange(cfg.elites))

    def forward(self, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """cond [E, B, C] (or [B, C], shared) -> (mean [E, B, S+1], logvar [E, B, S+1], term_logit [E, B])."""
        h = cond if cond.dim() == 3 else cond.expand(self.cfg.members, *cond.shape)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < len(self.weights) - 1:
                h = F.silu(h)
        D = self.out_dim
        mean, raw = h[..., :D], h[..., D:2 * D]
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw)  # MBPO's soft bounds
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar, h[..., 2 * D]

    def loss(self, x0: Tensor, cond: Tensor) -> Tensor:
        """x0 [E, B, S+2], cond [E, B, C]: Gaussian NLL of [delta, reward] + BCE of termination + bound penalty."""
        mean, logvar, logit = self(cond)
        y = x0[..., : self.out_dim]
        nll = (((mean - y) ** 2) * torch.exp(-logvar) + logvar).mean()
        bce = F.binary_cross_entropy_with_logits(logit, (x0[..., -1] > 0).float())
        return nll + bce + 0.01 * (self.max_logvar.sum() - self.min_logvar.sum())

    @torch.no_grad()
    def predict(self, states: Tensor, actions: Tensor, sample: bool = True, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (next_state [B, S], reward [B], terminated [B] bool, u [B]).

        sample=True: MBPO imagination (a random elite per row, a draw from its Gaussian); False: the mean of
        the elites' means. u: MOPO's max over elites of the norm of the predicted std."""
        cond = self.condition(states, actions)  # [B, C]
        mean, logvar, logit = self(cond)
        mean, std, logit = mean[self.elite_ids], torch.exp(0.5 * logvar[self.elite_ids]), logit[self.elite_ids]
        B = cond.shape[0]
        if sample:
            pick = torch.randint(0, len(self.elite_ids), (B,), generator=generator)
            rows = torch.arange(B)
            y = mean[pick, rows] + std[pick, rows] * torch.randn(mean.shape[1:], generator=generator)
            term = logit[pick, rows] > 0
        else:
            y, term = mean.mean(0), logit.mean(0) > 0
        x0 = torch.cat([y, torch.zeros(B, 1)], -1)
        nxt, r, _ = self.decode(states[:, -1], x0)
        u = std[..., : self.cfg.state_dim].norm(dim=-1).max(0).values
        return nxt, r, term, u


def train_ensemble(model: ProbabilisticEnsemble, data: Transitions, steps: int = 3000, batch_size: int = 256,
                   lr: float = 1e-3, seed: int = 0, val_share: float = 0.1) -> dict:
    """Bootstrapped NLL training of every member, then pick the elites by validation MSE. -> stats."""
    states, actions, nxt, rew, term, _ = windows(data, model.cfg.history)
    model.fit_normalizers(data.state, data.next_state, data.reward)
    with torch.no_grad():
        cond = model.condition(states, actions)
        x0 = model.target(states[:, -1], nxt, rew, term)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x0), generator=gen)
    n_val = max(1, int(val_share * len(x0)))
    val, tr = perm[:n_val], perm[n_val:]
    E = model.cfg.members
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    model.train()
    for _ in range(steps):
        idx = tr[torch.randint(0, len(tr), (E, batch_size), generator=gen)]  # [E, B]: a bootstrap per member
        loss = model.loss(x0[idx], cond[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        mean, _, _ = model(cond[val])
        mse = ((mean - x0[val][None, :, : model.out_dim]) ** 2).mean((1, 2))  # [E]
        model.elite_ids.copy_(mse.argsort()[: model.cfg.elites])
    return {"val_mse": mse.tolist(), "elites": model.elite_ids.tolist(), "final_loss": float(loss.detach())}

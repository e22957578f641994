"""Networks for the off-policy learners: MLPs, a fused critic ensemble, and two actor heads.

Inputs are observation tensors `[B, obs_dim]` (already normalised by the caller) and
actions `[B, act_dim]` in (-1, 1), the env's normalised action space. The critics
feed the losses in losses.py; the actors also act in the env and are exported for
the robot. Both actors expose `sample(obs) -> (action, log_prob)` and
`deterministic(obs) -> action`, so SAC and DSAC-T take either head.

Shapes: B batch, A action dims, n critics, K experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU}


def activation_layer(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def hidden_layers(in_dim: int, hidden: tuple[int, ...], activation: str = "relu",
                  layer_norm: bool = False) -> list[nn.Module]:
    """Linear -> (LayerNorm) -> activation, once per hidden width."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_dim, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(activation_layer(activation))
        in_dim = width
    return layers


def fp32(layer: nn.Module, h: Tensor) -> Tensor:
    """Run an output layer in float32, also under bf16 autocast (the hidden layers carry the matmul
    cost). Q values, log-stds and router logits need float32's resolution: bf16 keeps about three
    digits, so a Q of 300 would move in steps of 1-2, the size of a reward."""
    if not torch.is_autocast_enabled(h.device.type):
        return layer(h)
    with torch.autocast(h.device.type, enabled=False):
        return layer(h.float())


def mlp(in_dim: int, out_dim: int, hidden: tuple[int, ...] = (256, 256), activation: str = "relu",
        layer_norm: bool = False) -> nn.Sequential:
    """Plain MLP with a linear output layer."""
    last = hidden[-1] if hidden else in_dim
    return nn.Sequential(*hidden_layers(in_dim, hidden, activation, layer_norm), nn.Linear(last, out_dim))


# ---------------------------------------------------------------------------------------------
# Critics: n members fused into batched matmuls (one kernel per layer instead of n).
# ---------------------------------------------------------------------------------------------


class EnsembleLinear(nn.Module):
    """n independent Linear layers in one `baddbmm`: x [n, N, in] -> [n, N, out]."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim))  # [n, in, out] (nn.Linear's transposed)
        self.bias = nn.Parameter(torch.empty(n, 1, out_dim))  # [n, 1, out]
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, member by member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)

    def extra_repr(self) -> str:
        n, i, o = self.weight.shape
        return f"n={n}, in_dim={i}, out_dim={o}"


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the last dim with a separate affine (gain, bias) per member: [n, N, d]."""

    def __init__(self, n: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, dim))
        self.bias = nn.Parameter(torch.zeros(n, 1, dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:], eps=self.eps), self.weight)


class CriticEnsemble(nn.Module):
    """n Q critics (twin by default) as one module; member i equals its own nn.Linear stack.

    SAC (`distributional=False`): `forward(obs, act) -> q [n, *lead]`.
    DSAC-T (`distributional=True`): `-> (mu [n, *lead], sigma [n, *lead])`, the mean and std of
    each critic's Gaussian return distribution, sigma = softplus(raw) + sigma_min.
    `lead` is the broadcast of obs's and act's leading dims, so `critic(obs[:, None], actions)`
    with actions [B, K, A] scores every PMOE expert's action at once: [n, B, K].
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256), n_critics: int = 2,
                 distributional: bool = False, layer_norm: bool = False, activation: str = "relu",
                 sigma_min: float = 1e-4):
        super().__init__()
        self.n_critics, self.distributional, self.sigma_min = n_critics, distributional, sigma_min
        dims = [obs_dim + act_dim, *hidden]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers.append(EnsembleLinear(n_critics, d_in, d_out))
            if layer_norm:
                layers.append(EnsembleLayerNorm(n_critics, d_out))
            layers.append(activation_layer(activation))
        layers.append(EnsembleLinear(n_critics, dims[-1], 2 if distributional else 1))
        self.net = nn.Sequential(*layers)
        self._body, self._head = list(self.net)[:-1], self.net[-1]  # head runs in float32 (see fp32)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        lead = torch.broadcast_shapes(obs.shape[:-1], act.shape[:-1])
        x = torch.cat([obs.expand(*lead, -1), act.expand(*lead, -1)], -1)  # [*lead, obs+act]
        x = x.reshape(1, -1, x.shape[-1]).expand(self.n_critics, -1, -1)  # [n, N, obs+act], no copy
        for layer in self._body:
            x = layer(x)
        out = fp32(self._head, x).reshape(self.n_critics, *lead, -1)  # [n, *lead, 1 | 2]
        if not self.distributional:
            return out[..., 0]  # q: [n, *lead]
        mu, raw_sigma = out.unbind(-1)
        return mu, F.softplus(raw_sigma) + self.sigma_min


# ---------------------------------------------------------------------------------------------
# Actors
# ---------------------------------------------------------------------------------------------


def tanh_gaussian_sample(mean: Tensor, log_std: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reparameterised a = tanh(u), u = mean + std * noise; returns (a [..., A], log pi(a) [...]).

    log pi(a) = log N(u; mean, std) - sum log(1 - tanh(u)^2), with the Jacobian term written as
    log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)): exact, and finite where tanh(u) rounds to +-1
    (the usual -log(1 - tanh^2 + 1e-6) saturates there and biases the entropy).
    """
    if noise is None:
        noise = torch.randn_like(mean)
    u = mean + log_std.exp() * noise
    log_prob_u = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_det_tanh = (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
    return torch.tanh(u), log_prob_u - log_det_tanh


class TanhGaussianActor(nn.Module):
    """SAC's policy: MLP trunk -> mean, log_std (clamped to [log_std_min, log_std_max]) of a tanh-Gaussian.

    The clamp (rather than a tanh rescale) keeps log_std = 0 at init whatever the bounds, so
    DSAC-T's [-20, 0.5] and FastSAC's [-5, 0] both start with unit std.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256),
                 log_std_min: float = -20.0, log_std_max: float = 2.0, activation: str = "relu",
                 layer_norm: bool = False):
        super().__init__()
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        self.trunk = nn.Sequential(*hidden_layers(obs_dim, hidden, activation, layer_norm))
        width = hidden[-1] if hidden else obs_dim
        self.mean = nn.Linear(width, act_dim)
        self.log_std = nn.Linear(width, act_dim)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(obs)  # [B, H]
        return fp32(self.mean, h), fp32(self.log_std, h).clamp(self.log_std_min, self.log_std_max)  # [B, A] each

    def sample(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """action [B, A] in (-1, 1), log_prob [B]; reparameterised (gradients flow through both)."""
        mean, log_std = self(obs)
        return tanh_gaussian_sample(mean, log_std)

    def deterministic(self, obs: Tensor) -> Tensor:
        return torch.tanh(self(obs)[0])  # [B, A]


class PMOEActor(nn.Module):
    """PMOE policy head: a shared trunk -> K tanh-Gaussian experts + a router over them.

    The router reads the trunk features with the gradient stopped, so the router loss trains the
    router alone and only the experts' (actor) loss shapes the trunk.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256), n_experts: int = 4,
                 log_std_min: float = -20.0, log_std_max: float = 2.0, activation: str = "relu",
                 layer_norm: bool = False):
        super().__init__()
        self.n_experts, self.act_dim = n_experts, act_dim
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        self.trunk = nn.Sequential(*hidden_layers(obs_dim, hidden, activation, layer_norm))
        width = hidden[-1] if hidden else obs_dim
        self.mean = nn.Linear(width, n_experts * act_dim)
        self.log_std = nn.Linear(width, n_experts * act_dim)
        self.router = nn.Linear(width, n_experts)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> means [B, K, A], log_stds [B, K, A], router_probs [B, K]."""
        h = self.trunk(obs)  # [B, H]
        shape = (*h.shape[:-1], self.n_experts, self.act_dim)
        means = fp32(self.mean, h).reshape(shape)
        log_stds = fp32(self.log_std, h).reshape(shape).clamp(self.log_std_min, self.log_std_max)
        router_probs = torch.softmax(fp32(self.router, h.detach()), -1)  # sg: the router does not train the trunk
        return means, log_stds, router_probs

    @staticmethod
    def _pick(x: Tensor, k: Tensor) -> Tensor:
        """x [B, K, A], k [B] -> x[b, k[b]]: [B, A]."""
        return x.gather(-2, k[..., None, None].expand(*k.shape, 1, x.shape[-1])).squeeze(-2)

    def sample(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Acting / critic target: k ~ Categorical(router), a ~ expert k.

        Returns action [B, A] and log_prob [B], the chosen expert's own log-prob (as in PMOE).
        """
        means, log_stds, router_probs = self(obs)
        k = torch.multinomial(router_probs.reshape(-1, self.n_experts), 1).reshape(router_probs.shape[:-1])  # [B]
        return tanh_gaussian_sample(self._pick(means, k), self._pick(log_stds, k))

    def sample_all(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Every expert draws a reparameterised action: actions [B, K, A], log_probs [B, K]."""
        means, log_stds, _ = self(obs)
        return tanh_gaussian_sample(means, log_stds)

    def deterministic(self, obs: Tensor) -> Tensor:
        """tanh(mean) of the most probable expert: [B, A]."""
        means, _, router_probs = self(obs)
        return torch.tanh(self._pick(means, router_probs.argmax(-1)))

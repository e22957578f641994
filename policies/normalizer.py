"""Running observation normaliser: per-dimension mean/variance from the observations the trainer sees.

The trainer calls `update(obs [N, dim])` each env step and `normalize` before every network
call (acting and learning); `sync_` merges statistics across data-parallel ranks; the
exporter folds `as_affine()` into the policy's first layer (or embeds mean and scale), so the
robot sees the same normalisation as training.

Statistics are kept in float64 (count, mean, M2 = sum of squared deviations) and merged
with Chan et al.'s parallel formula, exact for any batch split:
    n = n_a + n_b,  delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n
var = M2 / n (population variance, numpy's default).

`min_std` floors the scale: x is divided by max(sqrt(var + eps), min_std), so a dimension whose
spread is below min_std is only centred, never amplified (0: every dimension is scaled to unit
variance).

Two sets are kept: `base` (statistics every rank agrees on, as of the last sync) and
`new` (this rank's batches since then), so calling `sync_` every step never counts a
sample twice. Without torch.distributed, everything simply accumulates.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

Moments = tuple[Tensor, Tensor, Tensor]  # count [], mean [dim], M2 [dim], all float64


def batch_moments(x: Tensor) -> Moments:
    """(count, mean, M2) of a batch x [B, dim]."""
    x = x.detach().to(torch.float64)
    mean = x.mean(dim=0)
    return x.new_full((), float(x.shape[0])), mean, ((x - mean) ** 2).sum(dim=0)  # no host->device copy


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan's pairwise merge of two sets of moments (either may be empty: count 0)."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    w_b = n_b / n.clamp_min(1.0)  # 0 when both are empty
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta**2 * n_a * w_b


def combine_moments(count: Tensor, mean: Tensor, m2: Tensor) -> Moments:
    """Merge R shards at once: count [R], mean [R, dim], M2 [R, dim] -> moments of all the data.

    Deviations are taken from the global mean (sum of M2_r + n_r (mean_r - mean)^2), which
    stays accurate when |mean| >> std, unlike the raw sum-of-squares form.
    """
    n = count.sum()
    mean_all = (count[:, None] * mean).sum(dim=0) / n.clamp_min(1.0)
    m2_all = (m2 + count[:, None] * (mean - mean_all) ** 2).sum(dim=0)
    return n, mean_all, m2_all


class RunningNorm:
    """clip((x - mean) / clamp(sqrt(var + eps), min_std, max_std), -clip, clip), mean/var tracked over every update.

    max_std caps the divisor (None: no cap); min_std = max_std = 1 centres every dimension without scaling it."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", eps: float = 1e-8, clip: float | None = 10.0,
                 min_std: float = 0.0, max_std: float | None = None):
        if not (min_std >= 0 and math.isfinite(min_std)):
            raise ValueError(f"RunningNorm min_std must be a finite number >= 0, got {min_std!r}")
        if max_std is not None and not (math.isfinite(max_std) and max_std > 0 and max_std >= min_std):
            raise ValueError(f"RunningNorm max_std must be a finite number > 0 and >= min_std ({min_std}), "
                             f"got {max_std!r}")
        self.dim, self.device, self.eps, self.clip, self.min_std = dim, torch.device(device), eps, clip, float(min_std)
        self.max_std = None if max_std is None else float(max_std)
        self.base = self._empty()  # agreed across ranks at the last sync_
        self.new = self._empty()  # this rank's batches since the last sync_
        self.frozen = False

    def _empty(self) -> Moments:
        z = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        return torch.zeros((), dtype=torch.float64, device=self.device), z, z.clone()

    # ---- statistics ---------------------------------------------------------------------
    @property
    def moments(self) -> Moments:
        return merge_moments(self.base, self.new)

    @property
    def count(self) -> Tensor:
        return self.base[0] + self.new[0]

    @property
    def mean(self) -> Tensor:  # [dim] float64
        return self.moments[1]

    @property
    def var(self) -> Tensor:  # [dim] float64; 1 before any data, so normalize starts as the identity
        n, _, m2 = self.moments
        return torch.where(n > 0, m2 / n.clamp_min(1.0), torch.ones_like(m2))

    @property
    def inv_std(self) -> Tensor:  # [dim] float64: 1 / max(sqrt(var + eps), min_std), what normalize multiplies by
        return self._mean_inv_std()[1]

    def _mean_inv_std(self) -> tuple[Tensor, Tensor]:
        n, mean, m2 = self.moments  # merged once
        var = torch.where(n > 0, m2 / n.clamp_min(1.0), torch.ones_like(m2))
        inv_std = torch.rsqrt(var + self.eps)
        if self.max_std is not None:
            inv_std = inv_std.clamp_min(1.0 / self.max_std)
        return mean, inv_std if self.min_std == 0 else inv_std.clamp_max(1.0 / self.min_std)

    def update(self, x: Tensor) -> None:
        """Fold a batch x [B, dim] into the statistics (no-op when frozen or B == 0)."""
        if self.frozen:
            return
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"RunningNorm.update expects [B, {self.dim}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        self.new = merge_moments(self.new, batch_moments(x.to(self.device)))

    def freeze(self) -> None:
        """Stop updating (evaluation, export, fine-tuning on the robot)."""
        self.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False

    # ---- applying -----------------------------------------------------------------------
    def as_affine(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(scale [dim], shift [dim]) with normalize(x) == clip(x * scale + shift), for folding into a layer.

        Equal in exact arithmetic. In float32 the folded form cancels |mean * scale| ~ |mean| / std
        against itself, so it loses about |mean| / std * 6e-8 absolute accuracy (1e-6 at a ratio of
        20, 1e-2 at 1e5); an exporter should keep an explicit subtract node when that ratio is large.
        """
        mean, scale = self._mean_inv_std()
        return scale.to(dtype), (-mean * scale).to(dtype)

    def normalize(self, x: Tensor) -> Tensor:
        """x [..., dim] -> clip((x - mean) * inv_std), in x's dtype. Subtracts first: no cancellation."""
        mean, inv_std = self._mean_inv_std()
        y = (x - mean.to(x.dtype)) * inv_std.to(x.dtype)
        return y if self.clip is None else y.clamp(-self.clip, self.clip)

    # ---- data parallel ------------------------------------------------------------------
    def sync_(self, process_group=None) -> None:
        """Merge every rank's new batches into the shared statistics (no-op without torch.distributed).

        Collective: every rank in the group must call it, in the same order.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        n, mean, m2 = self.new
        packed = torch.cat([n.reshape(1), mean, m2])  # [1 + 2 dim] float64
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(gathered, packed, group=process_group)
        g = torch.stack(gathered)  # [R, 1 + 2 dim]
        all_new = combine_moments(g[:, 0], g[:, 1 : 1 + self.dim], g[:, 1 + self.dim :])
        self.base = merge_moments(self.base, all_new)
        self.new = self._empty()

    # ---- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Merged statistics and the scale's bounds (tensors only; no cap is stored as inf). A resumed run loads them
        as the agreed base on every rank; a loaded normaliser takes the saved bounds, so it normalises as it trained."""
        n, mean, m2 = self.moments
        return {"count": n, "mean": mean, "m2": m2, "frozen": torch.tensor(self.frozen),
                "min_std": torch.tensor(self.min_std, dtype=torch.float64),
                "max_std": torch.tensor(math.inf if self.max_std is None else self.max_std, dtype=torch.float64)}

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        for k in ("mean", "m2"):
            if tuple(sd[k].shape) != (self.dim,):
                raise ValueError(f"RunningNorm state '{k}' has shape {tuple(sd[k].shape)} but this normaliser has "
                                 f"dim {self.dim}: it was saved for another observation layout")
        f64 = {"dtype": torch.float64, "device": self.device}
        self.base = (sd["count"].to(**f64).reshape(()), sd["mean"].to(**f64), sd["m2"].to(**f64))
        self.new = self._empty()
        self.frozen = bool(sd["frozen"])
        self.min_std = float(sd.get("min_std", 0.0))  # saved before the floor existed: none
        max_std = float(sd.get("max_std", math.inf))  # saved before the cap existed: none
        self.max_std = None if math.isinf(max_std) else max_std


class ReturnScale:
    """Divides learning rewards by the running std of the discounted return (reward normalisation).

    The critic's targets, the temperature's balance against rewards and DSAC-T's fixed epsilons are all in reward
    units, so a task's reward scale changes how SAC and DSAC-T learn (docs/BENCHMARKS.md, reward-scale tables).
    Dividing every learning reward by std(G), G_t = gamma * G_{t-1} + r_t tracked per env and reset at episode ends,
    makes learning invariant to a constant reward factor c: G and its std both scale by c. The mean is not removed
    (a shift of rewards changes the optimal policy where episodes can end early). Rewards are divided when a batch
    is sampled, so the buffer keeps raw rewards and every update sees one consistent scale.
    """

    def __init__(self, num_envs: int, gamma: float, device: torch.device | str = "cpu", eps: float = 1e-8,
                 target_std: float = 1.0):
        self.gamma = float(gamma)
        self.target_std = float(target_std)  # the std the return is brought to (rewards x target_std / std(G))
        self.stats = RunningNorm(1, device, eps=eps, clip=None)
        self.ret = torch.zeros(num_envs, dtype=torch.float64, device=self.stats.device)  # [num_envs] running G

    def update(self, reward: Tensor, done: Tensor) -> None:
        """reward, done: [num_envs]; folds this step's discounted returns into the statistics."""
        self.ret = self.gamma * self.ret + reward.detach().to(self.ret)
        self.stats.update(self.ret[:, None])
        self.ret = torch.where(done.to(self.ret.device), torch.zeros_like(self.ret), self.ret)

    @property
    def inv_std(self) -> Tensor:  # [] float64; 1 before any data
        return self.stats.inv_std[0]

    @property
    def frozen(self) -> bool:
        return self.stats.frozen

    def freeze(self) -> None:
        """Keep the current std from now on (update() still tracks G, and no longer folds it in)."""
        self.stats.freeze()

    def scale(self, reward: Tensor) -> Tensor:
        """reward [...] -> reward * target_std / std(G), in reward's dtype."""
        return reward * (self.target_std * self.inv_std).to(reward.dtype)

    def sync_(self) -> None:
        self.stats.sync_()

    def state_dict(self) -> dict[str, Tensor]:
        return self.stats.state_dict()

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        """The statistics only: a resumed or initialised run restarts its episodes, so G starts at 0."""
        self.stats.load_state_dict(sd)

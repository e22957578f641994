"""What remembers: a circular replay buffer of whole vectorised env steps, with n-step returns.

The trainer calls `add` once per env step with `[N, ...]` batches (N = num_envs); the
learners call `sample` for `[B, ...]` batches. Storage is laid out `[T, N, ...]`
(T = capacity // num_envs time slots per env), so one env's consecutive steps sit at
consecutive `t` and n-step windows are gathered with one indexed read, no Python loop.

`next_obs` is stored explicitly (not read from slot t+1) because where an episode ended
the true next observation is the env's `final_obs`, while slot t+1 already holds the
first observation of the next episode. The caller substitutes it before `add`.

Memory per transition (one env, one step), with s = bytes per element of obs_dtype:
    2 * (obs_dim + critic_obs_dim) * s   obs, critic_obs, next_obs, next_critic_obs
  + 4 * act_dim                          action (float32)
  + 4 + 1 + 1                            reward (float32), terminated, truncated (bool)
e.g. obs 48, critic 96, act 12, float32: 1152 + 48 + 6 = 1206 B; 1M transitions ~ 1.2 GB.
`ReplayBuffer.bytes_per_transition` gives the exact figure.

Shapes: T time slots, N envs, B batch, n n-step window, A action dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

_OBS_KEYS = ("obs", "critic_obs", "next_obs", "next_critic_obs")
_STORED = (*_OBS_KEYS, "action", "reward", "terminated", "truncated")
_SHAPE_KEYS = ("slots", "num_envs", "obs_dim", "critic_obs_dim", "act_dim")


class ReplayBuffer:
    """Circular `[T, N, ...]` transition store; n-step returns are formed at sample time."""

    def __init__(self, capacity: int, num_envs: int, obs_dim: int, critic_obs_dim: int, act_dim: int,
                 device: torch.device | str, n_step: int = 1, gamma: float = 0.99,
                 obs_dtype: torch.dtype = torch.float32):
        if num_envs < 1 or capacity < num_envs:
            raise ValueError(f"replay capacity {capacity} must hold at least one step of all {num_envs} envs")
        if n_step < 1:
            raise ValueError(f"n_step must be >= 1 (got {n_step})")
        self.num_envs, self.obs_dim, self.critic_obs_dim, self.act_dim = num_envs, obs_dim, critic_obs_dim, act_dim
        self.slots = capacity // num_envs  # T
        self.device = torch.device(device)
        self.n_step, self.gamma = n_step, gamma
        T, N, dev = self.slots, num_envs, self.device
        self.obs = torch.zeros(T, N, obs_dim, dtype=obs_dtype, device=dev)
        self.critic_obs = torch.zeros(T, N, critic_obs_dim, dtype=obs_dtype, device=dev)
        self.next_obs = torch.zeros(T, N, obs_dim, dtype=obs_dtype, device=dev)
        self.next_critic_obs = torch.zeros(T, N, critic_obs_dim, dtype=obs_dtype, device=dev)
        self.action = torch.zeros(T, N, act_dim, dtype=torch.float32, device=dev)
        self.reward = torch.zeros(T, N, dtype=torch.float32, device=dev)
        self.terminated = torch.zeros(T, N, dtype=torch.bool, device=dev)
        self.truncated = torch.zeros(T, N, dtype=torch.bool, device=dev)
        self.pos = 0  # next slot to write
        self.filled = 0  # written slots, <= T
        # gamma^j for j = 0..n; [:n] weights the rewards, [k] is the bootstrap discount
        self._gamma_pow = gamma ** torch.arange(n_step + 1, dtype=torch.float32, device=dev)  # [n+1]
        self._offsets = torch.arange(n_step, device=dev)  # [n]

    @property
    def bytes_per_transition(self) -> int:
        s = self.obs.element_size()
        return 2 * (self.obs_dim + self.critic_obs_dim) * s + 4 * self.act_dim + 4 + 1 + 1

    def __len__(self) -> int:
        return self.filled * self.num_envs

    def add(self, obs: Tensor, critic_obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor,
            next_critic_obs: Tensor, terminated: Tensor, truncated: Tensor) -> None:
        """Store one env step of all N envs. next_* must already be final_obs where an episode ended."""
        N = self.num_envs
        O, C = self.obs_dim, self.critic_obs_dim
        batch = {"obs": (obs, (N, O)), "critic_obs": (critic_obs, (N, C)), "next_obs": (next_obs, (N, O)),
                 "next_critic_obs": (next_critic_obs, (N, C)), "action": (action, (N, self.act_dim)),
                 "reward": (reward, (N,)), "terminated": (terminated, (N,)), "truncated": (truncated, (N,))}
        for name, (x, shape) in batch.items():
            if tuple(x.shape) != shape:
                raise ValueError(f"replay add: {name} has shape {tuple(x.shape)}, expected {shape} "
                                 f"(one step of all {N} envs)")
            getattr(self, name)[self.pos].copy_(x)
        self.pos = (self.pos + 1) % self.slots
        self.filled = min(self.filled + 1, self.slots)

    def end_episodes(self) -> None:
        """Mark the newest stored step of every env as truncated (unless it terminated): the
        episodes stop there, e.g. because the env was reset outside the trainer's loop. n-step
        windows then end at that step and bootstrap from its stored next observation."""
        if self.filled == 0:
            return
        newest = (self.pos - 1) % self.slots
        self.truncated[newest] |= ~self.terminated[newest]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Uniform over written (t, env) pairs; n-step targets y = reward + discount * (1 - done) * V(next_obs)."""
        if self.filled == 0:
            raise ValueError("replay sample: the buffer is empty; add transitions first")
        T, N, n = self.slots, self.num_envs, self.n_step
        gen_dev = generator.device if generator is not None else self.device
        flat = torch.randint(self.filled * N, (batch_size,), generator=generator, device=gen_dev).to(self.device)
        t, env = flat // N, flat % N  # [B]; slots [0, filled) are exactly the written ones
        out = {k: getattr(self, k)[t, env].float() for k in ("obs", "critic_obs")}
        out["action"] = self.action[t, env]
        newest = (self.pos - 1) % T
        avail = (newest - t) % T + 1  # [B] steps from t up to the newest written one
        steps = (t[:, None] + self._offsets) % T  # [B, n]
        envs = env[:, None].expand(-1, n)  # [B, n]
        r = self.reward[steps, envs]  # [B, n]
        ended = self.terminated[steps, envs] | self.truncated[steps, envs]  # [B, n] episode ended at step j
        # step j is in the window if it is written and no episode ended at an earlier step
        ended_before = torch.cumsum(ended.int(), dim=1) - ended.int()  # [B, n]
        inside = (self._offsets < avail[:, None]) & (ended_before == 0)  # [B, n]
        k = inside.sum(dim=1)  # [B] accumulated steps, >= 1
        last = (t + k - 1) % T  # [B] slot of the last accumulated step
        out["reward"] = (r * self._gamma_pow[:n] * inside).sum(dim=1)
        out["next_obs"] = self.next_obs[last, env].float()
        out["next_critic_obs"] = self.next_critic_obs[last, env].float()
        out["done"] = self.terminated[last, env].float()  # the window stops at a termination, so it is last
        out["discount"] = self._gamma_pow[k]
        return out

    def state_dict(self) -> dict[str, Tensor | int]:
        """Tensors and ints only (torch.load(weights_only=True) safe); unwritten slots are not saved."""
        sd: dict[str, Tensor | int] = {k: getattr(self, k) for k in _SHAPE_KEYS}
        sd.update(pos=self.pos, filled=self.filled)
        for k in _STORED:  # torch.save writes a view's whole storage, so a partial slice is cloned
            x = getattr(self, k)
            sd[k] = x if self.filled == self.slots else x[: self.filled].clone()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        for k in _SHAPE_KEYS:
            if int(sd[k]) != getattr(self, k):
                raise ValueError(f"replay state has {k}={int(sd[k])} but this buffer has {k}={getattr(self, k)}; "
                                 f"it was saved from a buffer of another shape")
        filled, pos = int(sd["filled"]), int(sd["pos"])
        if not (0 <= filled <= self.slots and 0 <= pos < self.slots):
            raise ValueError(f"replay state has filled={filled}, pos={pos} outside [0, {self.slots}]")
        for k in _STORED:
            dst, src = getattr(self, k), sd[k]
            if tuple(src.shape) != (filled, *dst.shape[1:]) or src.dtype != dst.dtype:
                raise ValueError(f"replay state '{k}' is {src.dtype} {tuple(src.shape)}, expected "
                                 f"{dst.dtype} {(filled, *dst.shape[1:])}")
        for k in _STORED:
            getattr(self, k)[:filled].copy_(sd[k])
        self.filled, self.pos = filled, pos


class TransitionBuffer:
    """Flat circular store of single transitions, added k at a time (robot ticks, interventions,
    recordings): the HIL learner's online and demonstration buffers. One-step targets only, because
    rows from different robots or episodes sit next to each other.

    add(obs [k, O], action [k, A], reward [k], next_obs [k, O], done [k]); sample(B) -> [B, ...].
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity, self.obs_dim, self.act_dim = capacity, obs_dim, act_dim
        self.device = torch.device(device)
        dev = self.device
        self.obs = torch.zeros(capacity, obs_dim, device=dev)
        self.next_obs = torch.zeros(capacity, obs_dim, device=dev)
        self.action = torch.zeros(capacity, act_dim, device=dev)
        self.reward = torch.zeros(capacity, device=dev)
        self.done = torch.zeros(capacity, device=dev)
        self.pos, self.filled = 0, 0

    def __len__(self) -> int:
        return self.filled

    def add(self, obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor, done: Tensor) -> None:
        k = obs.shape[0]
        shapes = {"obs": (obs, (k, self.obs_dim)), "next_obs": (next_obs, (k, self.obs_dim)),
                  "action": (action, (k, self.act_dim)), "reward": (reward, (k,)), "done": (done, (k,))}
        for name, (x, shape) in shapes.items():
            if tuple(x.shape) != shape:
                raise ValueError(f"transition buffer add: {name} has shape {tuple(x.shape)}, expected {shape}")
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise ValueError(f"transition buffer add: {name} holds NaN or Inf; the transitions were not added")
        if k == 0:
            return
        if k > self.capacity:  # only the newest `capacity` survive anyway
            obs, action, reward, next_obs, done = (x[-self.capacity:] for x in (obs, action, reward, next_obs, done))
            k = self.capacity
        idx = (self.pos + torch.arange(k)) % self.capacity  # [k]
        for name, x in (("obs", obs), ("next_obs", next_obs), ("action", action), ("reward", reward), ("done", done)):
            getattr(self, name)[idx.to(self.device)] = x.to(self.device, torch.float32)
        self.pos = (self.pos + k) % self.capacity
        self.filled = min(self.filled + k, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        if not self.filled:
            raise ValueError("transition buffer sample: the buffer is empty; add transitions first")
        i = torch.randint(self.filled, (batch_size,), generator=generator).to(self.device)  # [B]
        return {"obs": self.obs[i], "action": self.action[i], "reward": self.reward[i],
                "next_obs": self.next_obs[i], "done": self.done[i]}

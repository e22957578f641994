"""Transition data for world models: sim rollouts of a policy, MCAP recordings, windows of k steps.

Sources -> `Transitions` (flat rows, one per step, in episode then time order):
    collect_rollouts(task, policy, ...)   BatchedEnv + an ONNX policy (or any obs -> action callable)
                                          plus Gaussian exploration noise, per-env noise scale
    from_recordings(paths, spec)          control/recording.py: read_recording + transitions()
-> windows(data, k): the rows that have k steps of history inside their episode, as
   (states [M, k, S], actions [M, k, A], next_state [M, S], reward [M], terminated [M]).

The state is the env's critic observation (clean frame + privileged terms: for humanoids the base
height, base velocity and foot contacts the safe set needs); recordings only hold the policy
observation, so a model trained on them uses that (see docs/WORLD_MODELS.md).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from s2r.control.spec import RobotSpec


@dataclass
class Transitions:
    """Flat transitions; rows of one episode are consecutive and in time order."""

    state: Tensor  # [N, S]
    action: Tensor  # [N, A]
    reward: Tensor  # [N]
    next_state: Tensor  # [N, S]
    terminated: Tensor  # [N] bool: a real MDP end (fall), not a time limit
    episode: Tensor  # [N] long: episode id
    spec: RobotSpec | None = None
    obs_key: str = "critic"  # which observation the state is: "critic" or "policy"
    layout: dict[str, list[int]] | None = None  # term name -> [start, dim] in the state (state_layout)
    prior: Tensor | None = None  # [N, S] the simulator's next state for (state, action), for sim-prior models

    def with_prior(self, sim) -> Transitions:
        """A copy whose prior is sim.predict(state, action) (world_models/sim_prior.py SimPrior)."""
        return dataclasses.replace(self, prior=sim.predict(self.state, self.action))

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def select(self, rows: Tensor) -> Transitions:
        return Transitions(self.state[rows], self.action[rows], self.reward[rows], self.next_state[rows],
                           self.terminated[rows], self.episode[rows], self.spec, self.obs_key, self.layout,
                           self.prior[rows] if self.prior is not None else None)

    def split_episodes(self, held_out: float, seed: int = 0) -> tuple[Transitions, Transitions]:
        """(train, held-out) by whole episodes, so held-out trajectories are never seen in training."""
        ids = torch.unique(self.episode)
        perm = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
        n_out = max(1, int(round(held_out * len(ids))))
        out = torch.isin(self.episode, perm[:n_out])
        return self.select(~out), self.select(out)


def cat_transitions(parts: Sequence[Transitions]) -> Transitions:
    """Concatenate, renumbering episodes so ids stay unique (the sim prior kept only if every part has one)."""
    off, eps = 0, []
    for p in parts:
        eps.append(p.episode - p.episode.min() + off if len(p) else p.episode)
        off = int(eps[-1].max()) + 1 if len(p) else off
    return Transitions(*(torch.cat([getattr(p, k) for p in parts]) for k in
                         ("state", "action", "reward", "next_state", "terminated")), torch.cat(eps),
                       parts[0].spec, parts[0].obs_key, parts[0].layout,
                       torch.cat([p.prior for p in parts]) if all(p.prior is not None for p in parts) else None)


def state_layout(spec: RobotSpec, critic_dims: dict[str, int] | None) -> dict[str, list[int]]:
    """term name -> [start, dim] in the state vector: the spec's frame terms (scaled, as observed), then the
    task's privileged terms (critic_dims, in the env's order; None: the state is a policy observation with
    history 1, i.e. the frame alone)."""
    out, at = {}, 0
    for term in spec.observation.terms:
        out[term.name] = [at, term.dim]
        at += term.dim
    for name, dim in (critic_dims or {}).items():
        out[f"critic.{name}"] = [at, dim]
        at += dim
    return out


def windows(data: Transitions, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (states [M, k, S], actions [M, k, A], next_state [M, S], reward [M], terminated [M], rows [M]) for
    every row with k - 1 earlier rows of the same episode (rows: their index in data)."""
    N = len(data)
    rows = torch.arange(k - 1, N)
    ok = torch.ones(len(rows), dtype=torch.bool)
    for j in range(1, k):  # the row j steps back belongs to the same episode
        ok &= data.episode[rows - j] == data.episode[rows]
    rows = rows[ok]
    idx = rows[:, None] - torch.arange(k - 1, -1, -1)[None, :]  # [M, k], oldest first
    return (data.state[idx], data.action[idx], data.next_state[rows], data.reward[rows], data.terminated[rows],
            rows)


# ---- sources ------------------------------------------------------------------------------------


def onnx_actor(path: str | os.PathLike, spec: RobotSpec) -> Callable[[Tensor], Tensor]:
    """policy obs [N, obs_dim] -> actions [N, A] from an exported ONNX policy (batch-1 graph: one call per env),
    checked against the env's robot spec."""
    from s2r.control.onnx_policy import OnnxPolicy

    policy = OnnxPolicy(path, expected_spec=spec)

    def act(obs: Tensor) -> Tensor:
        return torch.from_numpy(np.stack([policy(o).copy() for o in obs.detach().cpu().numpy()]))

    return act


def checkpoint_actor(path: str | os.PathLike, spec: RobotSpec | None) -> Callable[[Tensor], Tensor]:
    """The deterministic policy of a training checkpoint or run dir, refused if trained for another spec."""
    from s2r.control.spec import check_spec_hash
    from s2r.policies.evaluate import load_run, policy_act

    cfg, agent, obs_norm, ck, ckpt = load_run(path)
    if spec is not None:
        check_spec_hash(ck.get("spec_hash"), spec, f"checkpoint {ckpt}")
    return policy_act(agent, obs_norm if cfg.normalize_obs else None, "cpu")


def load_actor(path: str | os.PathLike, spec: RobotSpec) -> Callable[[Tensor], Tensor]:
    """An .onnx export or a training checkpoint / run dir."""
    return onnx_actor(path, spec) if str(path).endswith(".onnx") else checkpoint_actor(path, spec)


@torch.no_grad()
def collect_rollouts(task: str, act: Callable[[Tensor], Tensor] | None, num_envs: int, steps: int,
                     noise: tuple[float, float] = (0.0, 0.3), seed: int = 0, env_kwargs: dict | None = None,
                     progress: Callable[[int], None] | None = None,
                     state_map: Callable[[Tensor], Tensor] | None = None) -> Transitions:
    """`steps` vectorised steps of `act` (None: uniform random actions) in `num_envs` envs of an s2r task,
    with Gaussian action noise whose std is drawn per env uniformly in `noise` (so the data spans careful
    and reckless behaviour, and falls). The state is the critic observation (through `state_map` when
    given, e.g. finetune.NominalSimTerms: what a robot cannot measure held fixed); next_state at an
    episode's end is info["final_obs"]."""
    from s2r.sim.gym import make_env

    env = make_env(task, num_envs, seed=seed, **(env_kwargs or {}))
    gen = torch.Generator().manual_seed(seed + 1)
    sigma = noise[0] + (noise[1] - noise[0]) * torch.rand(num_envs, 1, generator=gen)  # [N, 1]
    cols: dict[str, list[Tensor]] = {k: [] for k in ("state", "action", "reward", "next_state", "terminated",
                                                     "episode")}
    ep = torch.arange(num_envs)  # [N] current episode id of each env
    next_id = num_envs
    try:
        obs = env.reset(seed=seed)
        for t in range(steps):
            a = (act(obs["policy"]) if act is not None else torch.rand(num_envs, env.action_dim, generator=gen) * 2 - 1)
            a = (a + sigma * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
            nxt, r, term, trunc, info = env.step(a)
            done = term | trunc
            real_next = torch.where(done[:, None], info["final_obs"]["critic"], nxt["critic"]) if done.any() \
                else nxt["critic"]
            s, s_next = obs["critic"], real_next  # [N, S]
            if state_map is not None:
                s, s_next = state_map(s), state_map(s_next)
            for k, v in (("state", s), ("action", a), ("reward", r), ("next_state", s_next),
                         ("terminated", term), ("episode", ep.clone())):
                cols[k].append(v.cpu())
            if done.any():
                n_new = int(done.sum())
                ep[done] = torch.arange(next_id, next_id + n_new)
                next_id += n_new
            obs = nxt
            if progress is not None:
                progress(t)
        spec, layout = env.spec, state_layout(env.spec, env.critic_dims)
    finally:
        env.close()
    # [T, N, ...] -> env-major rows, so each episode's rows are consecutive and in time order
    flat = {k: torch.stack(v, 1).reshape(num_envs * steps, *v[0].shape[1:]) for k, v in cols.items()}
    return Transitions(flat["state"].float(), flat["action"].float(), flat["reward"].float(),
                       flat["next_state"].float(), flat["terminated"].bool(), flat["episode"].long(), spec, "critic",
                       layout)


def from_recordings(paths: Sequence[str | os.PathLike], spec: RobotSpec | None = None) -> Transitions:
    """Transitions of MCAP recordings (s2r's TickRecorder files), refused if made for another robot spec.

    Recordings hold the policy observation only, so the state is that; ticks without a recorded reward
    get 0; an episode's last tick (done, no next observation) is dropped; `terminated` stays False
    because a recording's episode end is an operator's decision, not a measured fall."""
    from s2r.control.recording import read_recording, transitions

    recs = [read_recording(p, expected_spec=spec) for p in paths]
    t = transitions(recs)
    keep = ~t["done"]
    rew = np.nan_to_num(t["reward"], nan=0.0)
    to = lambda a, dt=torch.float32: torch.as_tensor(np.ascontiguousarray(a[keep]), dtype=dt)  # noqa: E731
    rec_spec = spec
    if rec_spec is None and recs and getattr(recs[0], "spec", None) is not None:
        rec_spec = recs[0].spec
    layout = (state_layout(rec_spec, None) if rec_spec is not None and rec_spec.observation.history_length == 1
              else None)
    return Transitions(to(t["obs"]), to(t["action"]), to(rew), to(t["next_obs"]),
                       torch.zeros(int(keep.sum()), dtype=torch.bool), to(t["episode"], torch.long), rec_spec,
                       "policy", layout)

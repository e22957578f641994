"""Gymnasium interoperability, both directions.

s2r -> gymnasium
    S2RGymEnv        one env of a task as a `gymnasium.Env` (numpy float32, no auto-reset)
    S2RVectorEnv     a BatchedEnv as a `gymnasium.vector.VectorEnv` (SAME_STEP autoreset)
    register_gym_envs()  ids s2r/HumanoidWalk-v0, s2r/ArmReach-v0, s2r/ArmPick-v0 (run at import)

        import gymnasium, s2r.sim.gym
        env = gymnasium.make("s2r/HumanoidWalk-v0", render_mode="rgb_array")
        envs = gymnasium.make_vec("s2r/HumanoidWalk-v0", num_envs=64)   # -> S2RVectorEnv
        # or without importing first: gymnasium.make("s2r.sim.gym:s2r/HumanoidWalk-v0")

gymnasium -> s2r
    GymnasiumBatchedEnv  any gymnasium id (Pendulum-v1, Hopper-v5, ...) behind the BatchedEnv API
    make_env(name, num_envs, **kw)  an s2r task -> BatchedEnv, a gymnasium id -> GymnasiumBatchedEnv

Observations: the gymnasium views expose the POLICY observation; the privileged critic
observation travels in info["critic_obs"]. Actions are always in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from s2r.sim.env import BatchedEnv, EnvConfig, EnvError

# gymnasium id -> s2r task name
GYM_IDS: dict[str, str] = {
    "s2r/HumanoidWalk-v0": "humanoid-walk",
    "s2r/ArmReach-v0": "arm-reach",
    "s2r/ArmPick-v0": "arm-pick",
}

_ENV_FIELDS = tuple(f.name for f in dataclasses.fields(EnvConfig))


def _env_config(task: str, num_envs: int, kwargs: dict[str, Any], where: str) -> EnvConfig:
    unknown = sorted(set(kwargs) - set(_ENV_FIELDS))
    if unknown:
        raise EnvError(f"{where}: unknown argument(s) {unknown}; EnvConfig fields are "
                       f"{[f for f in _ENV_FIELDS if f not in ('task', 'num_envs')]}")
    return EnvConfig(task=task, num_envs=num_envs, **kwargs)


def _np(t: torch.Tensor) -> np.ndarray:
    """A fresh float32 numpy copy (never a view of an env buffer)."""
    return t.detach().to("cpu", torch.float32).numpy().copy()


def _render_fps(control_dt: float) -> float | int:
    fps = 1.0 / control_dt
    return int(round(fps)) if abs(fps - round(fps)) < 1e-9 else fps


# =====================================================================================
# s2r -> gymnasium: single env
# =====================================================================================
def _lazy_renderer(view):
    """The view's EnvRenderer, built on first use; None (with a warning) without a render_mode."""
    if view.render_mode is None:
        gymnasium.logger.warn("render() called without a render_mode; construct the env with "
                              "render_mode='rgb_array'")
        return None
    if view._renderer is None:
        from s2r.sim.render import EnvRenderer

        w, h, cam = view._render_size
        view._renderer = EnvRenderer(view.env, width=w, height=h, camera=cam)
    return view._renderer


class S2RGymEnv(gymnasium.Env):
    """One env of an s2r task behind the `gymnasium.Env` API.

    The batched env underneath (num_envs=1) auto-resets; this view hides that: when an
    episode ends, step() hands back the FINAL observation (the one gymnasium expects) and
    the caller must reset() before stepping again. The next reset() re-initialises the
    env from the env's generator (seeded by reset(seed=...) or EnvConfig.seed).

    info (step): critic_obs (privileged observation, float32), diverged (bool),
    reward_terms (weighted terms, floats), success (bool, tasks that define it).
    info (reset): critic_obs.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(self, task: str = "humanoid-walk", render_mode: str | None = None,
                 width: int = 640, height: int = 480, camera: str | None = "track", **env_kwargs: Any):
        if "num_envs" in env_kwargs:
            raise EnvError("S2RGymEnv is a single env: drop num_envs, or use "
                           "gymnasium.make_vec(id, num_envs=N) / S2RVectorEnv for a batch")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise EnvError(f"render_mode '{render_mode}' not supported; choose one of "
                           f"{self.metadata['render_modes']} or None")
        env_kwargs.setdefault("nthread", 1)  # one env: no thread pool
        self.env = BatchedEnv(_env_config(task, 1, env_kwargs, f"S2RGymEnv('{task}')"))
        self.task_name = task
        self.render_mode = render_mode
        self._render_size = (width, height, camera)
        self._renderer = None
        self._closed = False
        self._needs_reset = True
        self.obs_dim, self.critic_obs_dim = self.env.obs_dim, self.env.critic_obs_dim
        self.action_dim = self.env.action_dim
        self.control_dt = self.env.control_dt
        self.max_episode_steps = self.env.max_episode_steps
        self.metadata = {**type(self).metadata, "render_fps": _render_fps(self.control_dt)}
        self.observation_space = spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (self.action_dim,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)  # seeds self.np_random (gymnasium bookkeeping)
        obs = self.env.reset(seed=seed)  # seed: reseeds the env's torch generator
        self._needs_reset = False
        return _np(obs["policy"][0]), {"critic_obs": _np(obs["critic"][0])}

    def step(self, action):
        if self._needs_reset:
            raise EnvError("call reset() before step(): the env is new or its episode ended "
                           "(terminated or truncated)")
        a = np.asarray(action, dtype=np.float32)
        if a.shape != (self.action_dim,):
            raise EnvError(f"action has shape {a.shape}, expected ({self.action_dim},) for task "
                           f"'{self.task_name}'")
        obs, reward, terminated, truncated, binfo = self.env.step(torch.from_numpy(a.copy())[None])
        term, trunc = bool(terminated[0]), bool(truncated[0])
        if term or trunc:  # the batched env already started the next episode: report the final obs
            obs = binfo["final_obs"]
            self._needs_reset = True
        info: dict[str, Any] = {
            "critic_obs": _np(obs["critic"][0]),
            "diverged": bool(binfo["diverged"][0]),
            "reward_terms": {k: float(v) for k, v in binfo["log"]["reward_terms"].items()},
        }
        if "success" in binfo:
            info["success"] = bool(binfo["success"][0])
        return _np(obs["policy"][0]), float(reward[0]), term, trunc, info

    def render(self):
        r = _lazy_renderer(self)
        return None if r is None else r.frame(0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.env.close()


# =====================================================================================
# s2r -> gymnasium: vector env
# =====================================================================================
class S2RVectorEnv(gymnasium.vector.VectorEnv):
    """A BatchedEnv as a gymnasium VectorEnv (numpy), autoreset mode SAME_STEP.

    As in gymnasium's SyncVectorEnv(autoreset_mode=SAME_STEP): the observation of a finished
    env is the first observation of its next episode; info["final_obs"] (object array, entry i
    the [obs_dim] float32 final observation) with mask info["_final_obs"], and
    info["final_info"] (the finished envs' last step info: critic_obs, diverged, success,
    episode {"r", "l"}) with mask info["_final_info"]. Top-level info holds critic_obs for
    every env (for finished envs, of the new episode) and the step info of unfinished envs.

    Construct from a task name (`S2RVectorEnv("humanoid-walk", num_envs=64, seed=1)`) or wrap
    an existing BatchedEnv (`S2RVectorEnv(env)`).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50,
                "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, task: str | BatchedEnv = "humanoid-walk", num_envs: int = 16,
                 render_mode: str | None = None, width: int = 640, height: int = 480,
                 camera: str | None = "track", **env_kwargs: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise EnvError(f"render_mode '{render_mode}' not supported; choose one of "
                           f"{self.metadata['render_modes']} or None")
        if isinstance(task, BatchedEnv):
            if env_kwargs:
                raise EnvError(f"S2RVectorEnv(BatchedEnv): EnvConfig arguments {sorted(env_kwargs)} "
                               "apply only when building from a task name")
            self.env = task
        else:
            self.env = BatchedEnv(_env_config(task, num_envs, env_kwargs, f"S2RVectorEnv('{task}')"))
        self.num_envs = self.env.num_envs
        self.task_name = self.env.cfg.task
        self.render_mode = render_mode
        self._render_size = (width, height, camera)
        self._renderer = None
        self.obs_dim, self.critic_obs_dim = self.env.obs_dim, self.env.critic_obs_dim
        self.action_dim = self.env.action_dim
        self.control_dt = self.env.control_dt
        self.max_episode_steps = self.env.max_episode_steps
        self.metadata = {**type(self).metadata, "render_fps": _render_fps(self.control_dt)}
        self.single_observation_space = spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32)
        self.single_action_space = spaces.Box(-1.0, 1.0, (self.action_dim,), np.float32)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None):
        if isinstance(seed, (list, tuple)):  # one generator drives the whole batch
            if all(s is None for s in seed):
                seed = None
            else:
                raise EnvError("S2RVectorEnv.reset takes one integer seed for the batch (one "
                               "generator drives all envs), not a per-env list")
        if options and "reset_mask" in options:
            raise EnvError("S2RVectorEnv autoresets in the same step (SAME_STEP): partial resets "
                           "via options['reset_mask'] are not supported")
        super().reset(seed=seed)
        obs = self.env.reset(seed=seed)
        mask = np.ones(self.num_envs, dtype=bool)
        return _np(obs["policy"]), {"critic_obs": _np(obs["critic"]), "_critic_obs": mask}

    def step(self, actions):
        a = actions if isinstance(actions, torch.Tensor) else torch.as_tensor(np.asarray(actions, dtype=np.float32))
        obs, reward, terminated, truncated, binfo = self.env.step(a)
        term = terminated.cpu().numpy().copy()
        trunc = truncated.cpu().numpy().copy()
        done = term | trunc
        n = self.num_envs
        info: dict[str, Any] = {"critic_obs": _np(obs["critic"]), "_critic_obs": np.ones(n, dtype=bool)}
        diverged = binfo["diverged"].cpu().numpy().copy()
        success = binfo["success"].cpu().numpy().copy() if "success" in binfo else None
        live = ~done
        if live.any():
            info["diverged"], info["_diverged"] = np.where(live, diverged, False), live.copy()
            if success is not None:
                info["success"], info["_success"] = np.where(live, success, False), live.copy()
        if done.any():
            final = binfo["final_obs"]
            fp, fc = _np(final["policy"]), _np(final["critic"])
            final_obs = np.full(n, None, dtype=object)
            for i in np.flatnonzero(done):
                final_obs[i] = fp[i].copy()
            ep = binfo["episode"]
            ids = ep["env_ids"].cpu().numpy()
            r, ln = np.zeros(n, np.float32), np.zeros(n, np.int64)
            r[ids] = ep["return"].cpu().numpy()
            ln[ids] = ep["length"].cpu().numpy()
            final_info: dict[str, Any] = {
                "critic_obs": np.where(done[:, None], fc, 0.0).astype(np.float32), "_critic_obs": done.copy(),
                "diverged": diverged & done, "_diverged": done.copy(),
                "episode": {"r": r, "_r": done.copy(), "l": ln, "_l": done.copy()}, "_episode": done.copy(),
            }
            if success is not None:
                final_info["success"], final_info["_success"] = success & done, done.copy()
            info.update({"final_obs": final_obs, "_final_obs": done.copy(),
                         "final_info": final_info, "_final_info": done.copy()})
        rew = reward.detach().to("cpu", torch.float64).numpy().copy()
        return _np(obs["policy"]), rew, term, trunc, info

    def render(self):
        r = _lazy_renderer(self)
        return None if r is None else tuple(r.frame(i) for i in range(self.num_envs))

    def close_extras(self, **kwargs: Any) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.env.close()


# =====================================================================================
# registration
# =====================================================================================
def register_gym_envs() -> None:
    """Register the s2r tasks with gymnasium (idempotent). No TimeLimit is added: the envs
    truncate themselves at the task's episode length (truncated=True)."""
    for gym_id, task in GYM_IDS.items():
        if gym_id in gymnasium.registry:
            continue
        gymnasium.register(
            id=gym_id,
            entry_point="s2r.sim.gym:S2RGymEnv",
            vector_entry_point="s2r.sim.gym:S2RVectorEnv",
            max_episode_steps=None,
            kwargs={"task": task},
        )


register_gym_envs()


# =====================================================================================
# gymnasium -> s2r
# =====================================================================================
def _gym_spec(env_id: str):
    """The gymnasium EnvSpec of env_id ('module:Id-v0' imports module first), or EnvError."""
    name = env_id
    if ":" in env_id:
        module, name = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise EnvError(f"gymnasium id '{env_id}': cannot import module '{module}': {e}") from None
    try:
        return gymnasium.spec(name)
    except gymnasium.error.Error as e:
        raise EnvError(f"'{env_id}' is not a registered gymnasium id ({e})") from None


def _is_gym_id(env_id: str) -> bool:
    try:
        _gym_spec(env_id)
        return True
    except EnvError:
        return False


class GymnasiumBatchedEnv:
    """Any gymnasium env id behind the s2r BatchedEnv API (torch tensors [num_envs, ...]).

    Runs `num_envs` copies in a gymnasium SyncVectorEnv (or AsyncVectorEnv:
    vectorization_mode="async") with SAME_STEP autoreset, so the returned observation of a
    finished env is already its next episode's first one and info["final_obs"] holds the
    final one, as BatchedEnv does. Actions in [-1, 1] (clipped) are mapped affinely onto the
    env's Box bounds (dimensions with an infinite bound pass through unscaled). The critic
    observation is the policy observation (no privileged state). Non-Box observations are
    flattened with gymnasium.spaces.flatten (Discrete -> one-hot).
    """

    def __init__(self, env_id: str, num_envs: int = 16, seed: int = 0, device: str = "cpu",
                 vectorization_mode: str = "sync", max_episode_steps: int | None = None,
                 **make_kwargs: Any):
        if not isinstance(num_envs, int) or num_envs <= 0:
            raise EnvError(f"num_envs must be a positive integer, got {num_envs!r}")
        if vectorization_mode not in ("sync", "async"):
            raise EnvError(f"vectorization_mode must be 'sync' or 'async', got '{vectorization_mode}'")
        gym_spec = _gym_spec(env_id)
        self.env_id = env_id
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.seed = seed
        self.spec = None  # no s2r RobotSpec behind a gymnasium env
        if max_episode_steps is not None:
            make_kwargs["max_episode_steps"] = max_episode_steps
        try:
            self.venv = gymnasium.make_vec(
                env_id, num_envs=num_envs, vectorization_mode=vectorization_mode,
                vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, **make_kwargs)
        except TypeError as e:
            raise EnvError(f"gymnasium env '{env_id}' rejected the arguments {sorted(make_kwargs)}: {e}") from None
        try:
            act_space = self.venv.single_action_space
            if not isinstance(act_space, spaces.Box):
                raise EnvError(f"gymnasium env '{env_id}' has a {type(act_space).__name__} action space "
                               f"({act_space}); only Box (continuous) action spaces are supported")
            if len(act_space.shape) != 1:
                raise EnvError(f"gymnasium env '{env_id}' has a Box action space of shape "
                               f"{act_space.shape}; only 1-D Box action spaces are supported")
        except EnvError:
            self.venv.close()
            raise
        self.single_observation_space = self.venv.single_observation_space
        self.single_action_space = act_space
        self.obs_dim = int(spaces.flatdim(self.single_observation_space))
        self.critic_obs_dim = self.obs_dim
        self.action_dim = int(act_space.shape[0])
        low = act_space.low.astype(np.float64)
        high = act_space.high.astype(np.float64)
        self._scaled = np.isfinite(low) & np.isfinite(high)
        self._center = np.where(self._scaled, (high + low) / 2, 0.0)
        self._half = np.where(self._scaled, (high - low) / 2, 1.0)
        self.action_low, self.action_high = low, high
        self.control_dt = self._control_dt()
        self.max_episode_steps = (max_episode_steps if max_episode_steps is not None
                                  else gym_spec.max_episode_steps)
        if self.max_episode_steps is None:  # an env that truncates itself (e.g. s2r/...-v0) may say
            try:
                self.max_episode_steps = int(self.venv.get_attr("max_episode_steps")[0])
            except Exception:  # noqa: BLE001 - no time limit known: None
                pass
        self.episode_return = np.zeros(num_envs, dtype=np.float64)
        self.episode_step = np.zeros(num_envs, dtype=np.int64)
        self._obs: dict[str, torch.Tensor] | None = None
        self._seeded = False

    def _control_dt(self) -> float:
        try:
            dt = self.venv.get_attr("dt")[0]
            if dt is not None and float(dt) > 0:
                return float(dt)
        except Exception:  # noqa: BLE001 - envs without a dt attribute
            pass
        fps = self.venv.metadata.get("render_fps")
        if fps:
            return 1.0 / float(fps)
        return 1.0

    # ---- public API (same as BatchedEnv) -----------------------------------------------
    @property
    def observation_space_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"policy": (self.obs_dim,), "critic": (self.critic_obs_dim,)}

    def reset(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Reset every env. Without a seed the first reset uses the constructor's seed."""
        if seed is None and not self._seeded:
            seed = self.seed
        obs, _ = self.venv.reset(seed=seed)
        self._seeded = True
        self.episode_return[:] = 0
        self.episode_step[:] = 0
        self._obs = self._wrap_obs(obs)
        return self._obs

    def step(self, action):
        """action: [N, action_dim] in [-1, 1]. Returns obs, reward [N], terminated [N],
        truncated [N], info (final_obs where terminated | truncated, episode stats)."""
        if self._obs is None:
            raise EnvError("call reset() before step()")
        a = self._check_action(action)
        env_action = (self._center + self._half * a.astype(np.float64)).astype(self.single_action_space.dtype)
        obs, reward, terminated, truncated, vinfo = self.venv.step(env_action)
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool) & ~terminated
        reward = np.nan_to_num(np.asarray(reward, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        self.episode_return += reward
        self.episode_step += 1
        next_obs = self._wrap_obs(obs)
        done = terminated | truncated
        dev = self.device
        info: dict[str, Any] = {"log": {"reward_terms": {}},
                                "diverged": torch.zeros(self.num_envs, dtype=torch.bool, device=dev),
                                "diverged_total": 0}
        if done.any():
            final = next_obs["policy"].clone()  # valid everywhere: next obs where not done
            mask = vinfo.get("_final_obs", done)
            for i in np.flatnonzero(done & mask):
                final[i] = torch.as_tensor(self._flatten_one(vinfo["final_obs"][i]), device=dev)
            info["final_obs"] = {"policy": final, "critic": final.clone()}
            ids = np.flatnonzero(done)
            info["episode"] = {
                "return": torch.as_tensor(self.episode_return[ids], dtype=torch.float32, device=dev),
                "length": torch.as_tensor(self.episode_step[ids], dtype=torch.long, device=dev),
                "env_ids": torch.as_tensor(ids, dtype=torch.long, device=dev),
            }
            if "final_info" in vinfo and "is_success" in vinfo["final_info"]:
                fi = vinfo["final_info"]
                succ = np.asarray(fi["is_success"], dtype=bool) & np.asarray(fi.get("_is_success", done))
                info["success"] = torch.as_tensor(succ & done, device=dev)
            self.episode_return[ids] = 0
            self.episode_step[ids] = 0
        self._obs = next_obs
        return (next_obs, torch.as_tensor(reward, dtype=torch.float32, device=dev),
                torch.as_tensor(terminated, device=dev), torch.as_tensor(truncated, device=dev), info)

    def close(self) -> None:
        self.venv.close()

    # ---- internals ---------------------------------------------------------------------
    def _check_action(self, action) -> np.ndarray:
        if isinstance(action, torch.Tensor):
            a = action.detach().to("cpu", torch.float32).numpy()
        else:
            a = np.asarray(action, dtype=np.float32)
        if a.shape != (self.num_envs, self.action_dim):
            raise EnvError(f"action has shape {tuple(a.shape)}, expected "
                           f"[num_envs={self.num_envs}, action_dim={self.action_dim}] for gymnasium env "
                           f"'{self.env_id}'")
        bad = ~np.isfinite(a)
        if bad.any():
            env_ids = np.flatnonzero(bad.any(1)).tolist()
            raise EnvError(f"action contains NaN/Inf in env(s) {env_ids[:10]}"
                           f"{' ...' if len(env_ids) > 10 else ''}")
        return np.clip(a, -1.0, 1.0)

    def _flatten_one(self, obs) -> np.ndarray:
        if isinstance(self.single_observation_space, spaces.Box):
            return np.asarray(obs, dtype=np.float32).reshape(-1)
        return np.asarray(spaces.flatten(self.single_observation_space, obs), dtype=np.float32)

    def _wrap_obs(self, obs) -> dict[str, torch.Tensor]:
        if isinstance(self.single_observation_space, spaces.Box):
            flat = np.asarray(obs, dtype=np.float32).reshape(self.num_envs, -1)
        else:
            from gymnasium.vector.utils import iterate

            flat = np.stack([self._flatten_one(o) for o in iterate(self.venv.observation_space, obs)])
        policy = torch.as_tensor(flat.copy(), dtype=torch.float32, device=self.device)
        return {"policy": policy, "critic": policy.clone()}


# =====================================================================================
# factory
# =====================================================================================
def make_env(task_or_gym_id: str, num_envs: int, **kw: Any):
    """An s2r task name (or its s2r/...-v0 gymnasium id) -> BatchedEnv(EnvConfig(...));
    'isaaclab:<Isaac Lab task id>' -> IsaacLabBatchedEnv (sim/isaaclab.py; Isaac Lab imported only
    then); any other registered gymnasium id -> GymnasiumBatchedEnv. kw: EnvConfig fields for s2r
    tasks; for Isaac Lab tasks seed, device, physics; for gymnasium ids seed, device,
    vectorization_mode, max_episode_steps and the env's own make() kwargs."""
    from s2r.sim.isaaclab import is_isaaclab_task
    from s2r.sim.tasks import TASKS

    if is_isaaclab_task(task_or_gym_id):
        from s2r.sim.isaaclab import IsaacLabBatchedEnv

        return IsaacLabBatchedEnv(task_or_gym_id, num_envs=num_envs, **kw)
    name = GYM_IDS.get(task_or_gym_id, task_or_gym_id)
    if name in TASKS:
        return BatchedEnv(_env_config(name, num_envs, kw, f"make_env('{task_or_gym_id}')"))
    try:
        _gym_spec(task_or_gym_id)
    except EnvError as e:
        raise EnvError(f"unknown env '{task_or_gym_id}': not an s2r task (known: {sorted(TASKS)}) "
                       f"and {e}") from None
    return GymnasiumBatchedEnv(task_or_gym_id, num_envs=num_envs, **kw)


__all__ = ["S2RGymEnv", "S2RVectorEnv", "GymnasiumBatchedEnv", "register_gym_envs", "make_env",
           "GYM_IDS"]

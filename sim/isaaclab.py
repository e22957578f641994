"""Isaac Lab 3.0 as a simulator for s2r's algorithms: any Isaac Lab task behind BatchedEnvProtocol.

    s2r train --task isaaclab:Isaac-Cartpole --algo sac          (in .venv-isaac: `make isaac`)
    env = make_env("isaaclab:Isaac-Cartpole", num_envs=64)       # -> IsaacLabBatchedEnv

Where the data comes from: Isaac Lab's own env (`gymnasium.make(task, cfg=parse_env_cfg(...))`,
a ManagerBasedRLEnv or DirectRLEnv), run kit-less (no Isaac Sim) on Newton physics with the MuJoCo
Warp solver (`physics=newton_mjwarp`) on the device the caller names (cpu or cuda). Where it goes:
s2r's trainer, evaluation and export, as torch tensors [num_envs, ...] on that device.

Mapping (Isaac Lab -> s2r):
    obs groups        {"policy": [N, d], "critic": [N, c]} -> the same keys; critic = policy where the
                      task has no critic group; a group of separate terms is concatenated in term order
    reward            as Isaac Lab computes it (manager-based tasks: sum of weight * term * step_dt)
    terminated        Isaac Lab's terminated; truncated = its time_outs & ~terminated (kept apart)
    final observation Isaac Lab's extras["final_obs"] (cfg.compute_final_obs = True, set here): the
                      observation of the terminal state, computed before the same-step reset
    actions           s2r's [-1, 1] mapped affinely onto the env's Box bounds, as
                      GymnasiumBatchedEnv does; Isaac Lab's boxes are unbounded, so actions pass
                      through and each action term's own scale applies (Cartpole: 100 N per unit)

Isaac Lab is imported inside IsaacLabBatchedEnv only: `import s2r` never imports it, and it runs in
its own venv (Python 3.12, torch 2.11.0). One Isaac Lab env per process (its SimulationContext is a
singleton): the trainer evaluates on the first envs of its training env (`first_envs`).

Assets: Isaac Lab fetches robot and ground USD files from NVIDIA's asset server at run time.
Unless the user sets ISAACSIM_ASSET_ROOT, `ensure_asset_root()` builds a local root (the layout
`Isaac/IsaacLab/...`) from what the isaaclab wheel ships (the flattened cartpole stage of its tests)
plus s2r's ground plane (sim/isaac_assets/), so the Cartpole tasks run without internet. A task
whose asset is missing stops with the file and the variable to set (check_assets).
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from s2r.control.spec import ActionSpec, JointSpec, ObservationSpec, ObsTerm, RobotSpec
from s2r.sim.env import EnvError

PREFIX = "isaaclab:"  # s2r task name = PREFIX + Isaac Lab task id, e.g. isaaclab:Isaac-Cartpole
DEFAULT_PHYSICS = "newton_mjwarp"  # kit-less Newton + MuJoCo Warp (Isaac Lab's `physics=` preset)
ASSET_ROOT_VAR = "ISAACSIM_ASSET_ROOT"
INSTALL_HINT = ("Isaac Lab is not installed in this Python: run `make isaac` (builds .venv-isaac with Python "
                "3.12, torch 2.11.0 and isaaclab 3.0.0) and use .venv-isaac/bin/s2r")

# Where the local asset root is built when ISAACSIM_ASSET_ROOT is unset.
LOCAL_ASSET_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "s2r" / "isaaclab-assets"
_GROUND_PLANE_SRC = Path(__file__).parent / "isaac_assets" / "default_ground_plane.usda"
# files of the local root (relative to it) -> how they are made
_CARTPOLE_USD = "Isaac/IsaacLab/Robots/Classic/Cartpole/cartpole.usd"
_GROUND_PLANE_USD = "Isaac/IsaacLab/Environments/Grid/default_ground_plane_checker_v1/default_ground_plane.usda"
# the wheel's flattened cartpole stage (isaaclab/source/isaaclab_tasks/test/golden_stages/...)
_GOLDEN_CARTPOLE = Path("source/isaaclab_tasks/test/golden_stages/cartpole/physx-newton_renderer-rgb.usda")
_GOLDEN_ROBOT_PRIM = "/World/envs/env_0/Robot"


def is_isaaclab_task(task: str) -> bool:
    return task.startswith(PREFIX)


def isaaclab_task_id(task: str) -> str:
    """'isaaclab:Isaac-Cartpole' -> 'Isaac-Cartpole'."""
    if not is_isaaclab_task(task) or len(task) == len(PREFIX):
        raise EnvError(f"'{task}' is not an Isaac Lab task name: write {PREFIX}<Isaac Lab task id>, "
                       f"e.g. {PREFIX}Isaac-Cartpole")
    return task[len(PREFIX):]


# =====================================================================================
# offline assets
# =====================================================================================
def _isaaclab_package_dir() -> Path:
    """The installed isaaclab package folder, found without importing it (its import reads the
    asset-root variable once)."""
    spec = importlib.util.find_spec("isaaclab")
    if spec is None or not spec.submodule_search_locations:
        raise EnvError(INSTALL_HINT)
    return Path(list(spec.submodule_search_locations)[0])


def build_local_asset_root(root: Path = LOCAL_ASSET_ROOT) -> Path:
    """Write the offline asset root (idempotent): the cartpole robot cut out of the wheel's flattened
    cartpole stage, and s2r's ground plane. Returns `root`."""
    cartpole = root / _CARTPOLE_USD
    if not cartpole.is_file():
        golden = _isaaclab_package_dir() / _GOLDEN_CARTPOLE
        if not golden.is_file():
            raise EnvError(f"cannot build the offline Isaac Lab assets: {golden} (shipped by isaaclab 3.0.0) is "
                           f"missing; set {ASSET_ROOT_VAR} to a copy of NVIDIA's Isaac Sim assets")
        _write_robot_usd(golden, _GOLDEN_ROBOT_PRIM, cartpole, "cartpole")
    ground = root / _GROUND_PLANE_USD
    if not ground.is_file():
        ground.parent.mkdir(parents=True, exist_ok=True)
        tmp = ground.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(_GROUND_PLANE_SRC.read_text())
        os.replace(tmp, ground)
    return root


def _write_robot_usd(stage_path: Path, robot_prim: str, out: Path, name: str) -> None:
    """Copy the robot prim of a flattened stage (with the prototypes its instanceable visuals and
    collisions reference) into a new layer whose default prim is `name`; written atomically."""
    from pxr import Sdf

    src = Sdf.Layer.FindOrOpen(str(stage_path))
    if src is None or not src.GetPrimAtPath(robot_prim):
        raise EnvError(f"{stage_path}: no prim {robot_prim} to build the {name} asset from")
    dst = Sdf.Layer.CreateAnonymous(".usda")
    dst.defaultPrim = name
    for key in ("metersPerUnit", "kilogramsPerUnit", "upAxis"):
        if src.pseudoRoot.customData.get(key) is None and key in src.pseudoRoot.ListInfoKeys():
            dst.pseudoRoot.SetInfo(key, src.pseudoRoot.GetInfo(key))
    for prim in src.rootPrims:  # the instance prototypes live at the root (/Flattened_Prototype_*)
        if prim.name.startswith("Flattened_Prototype"):
            Sdf.CopySpec(src, prim.path, dst, prim.path)
    Sdf.CopySpec(src, robot_prim, dst, Sdf.Path(f"/{name}"))  # relationship targets inside are remapped
    root = dst.GetPrimAtPath(f"/{name}")
    root.specifier = Sdf.SpecifierDef
    for attr in ("xformOp:translate", "xformOp:orient", "xformOp:scale", "xformOpOrder"):
        if attr in root.attributes:  # the pose comes from the task's init_state, not the asset
            root.RemoveProperty(root.attributes[attr])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.usda")
    dst.Export(str(tmp))
    os.replace(tmp, out)


def ensure_asset_root() -> str:
    """The asset root Isaac Lab will read: the user's ISAACSIM_ASSET_ROOT, or else the local one
    (built here, then exported in the variable). Call before isaaclab is imported."""
    if os.environ.get(ASSET_ROOT_VAR):
        return os.environ[ASSET_ROOT_VAR]
    root = str(build_local_asset_root())
    os.environ[ASSET_ROOT_VAR] = root
    return root


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def check_assets(cfg: Any, task_id: str) -> None:
    """EnvError naming the first local USD/URDF/MJCF file the task's scene needs that is missing."""
    scene = getattr(cfg, "scene", None)
    if scene is None:
        return
    for name, value in vars(scene).items():
        spawn = getattr(value, "spawn", None)
        for attr in ("usd_path", "asset_path"):
            path = getattr(spawn, attr, None)
            if not isinstance(path, str) or _is_remote(path):
                continue
            if not Path(path.removeprefix("file://")).exists():
                raise EnvError(f"Isaac Lab task {task_id}: asset file {path} (scene entity '{name}') is missing; "
                               f"set {ASSET_ROOT_VAR} to a copy of NVIDIA's Isaac Sim assets (the folder holding "
                               f"Isaac/IsaacLab/...)")


# =====================================================================================
# the env
# =====================================================================================
def _import_isaaclab():
    """(gymnasium, parse_env_cfg) with Isaac Lab's tasks registered; EnvError saying how to install."""
    ensure_asset_root()
    try:
        import gymnasium
        import isaaclab_tasks  # noqa: F401  (registers the Isaac-* ids with gymnasium)
        from isaaclab_tasks.utils import parse_env_cfg

        from s2r.sim import isaaclab_g1  # noqa: F401  (registers s2r's own Isaac-S2R-G1-Stand)
    except ImportError as e:
        if (e.name or "").split(".")[0] in ("isaaclab", "isaaclab_tasks"):
            raise EnvError(INSTALL_HINT) from None
        raise
    return gymnasium, parse_env_cfg


def isaaclab_task_ids() -> list[str]:
    """Every Isaac Lab task id registered with gymnasium (imports Isaac Lab)."""
    gymnasium, _ = _import_isaaclab()
    return sorted(k for k, v in gymnasium.registry.items()
                  if "env_cfg_entry_point" in (v.kwargs or {}) and k.startswith("Isaac-"))


def _check_task_id(task_id: str) -> None:
    ids = isaaclab_task_ids()
    if task_id in ids:
        return
    close = difflib.get_close_matches(task_id, ids, n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(PREFIX + c for c in close)}" if close else f"{len(ids)} tasks are registered"
    raise EnvError(f"unknown Isaac Lab task '{task_id}' ({hint}); list them with "
                   f"python -c 'from s2r.sim.isaaclab import isaaclab_task_ids; print(isaaclab_task_ids())'")


def _flat_group(group: Any, name: str) -> torch.Tensor:
    """One observation group -> [N, d] float32: a tensor as is, a dict of terms concatenated in order."""
    if isinstance(group, torch.Tensor):
        return group.reshape(group.shape[0], -1).float()
    if isinstance(group, dict):
        return torch.cat([_flat_group(v, f"{name}/{k}") for k, v in group.items()], dim=-1)
    raise EnvError(f"Isaac Lab observation group '{name}' is a {type(group).__name__}; s2r needs tensors")


def _box_bounds(space: Any, task_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) [A] float64 of a 1-D Box action space."""
    import numpy as np
    from gymnasium import spaces

    if not isinstance(space, spaces.Box) or len(space.shape) != 1:
        raise EnvError(f"Isaac Lab task {task_id} has the action space {space}; s2r needs a 1-D Box (continuous)")
    return (torch.as_tensor(np.asarray(space.low, np.float64)), torch.as_tensor(np.asarray(space.high, np.float64)))


class IsaacLabBatchedEnv:
    """An Isaac Lab task behind s2r's BatchedEnvProtocol (policies/env_protocol.py).

    task: 'isaaclab:<Isaac Lab task id>' (or the bare id). device: the simulation device (cpu, cuda:0);
    tensors come back on it. physics: Isaac Lab's physics preset (default newton_mjwarp, kit-less).
    configure(cfg): optional edit of the parsed Isaac Lab env cfg before the env is built.
    """

    def __init__(self, task: str, num_envs: int = 16, seed: int = 0, device: str = "cpu",
                 physics: str = DEFAULT_PHYSICS, configure: Callable[[Any], None] | None = None):
        if not isinstance(num_envs, int) or num_envs <= 0:
            raise EnvError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.task_id = isaaclab_task_id(task) if is_isaaclab_task(task) else task
        self.task = PREFIX + self.task_id
        gymnasium, parse_env_cfg = _import_isaaclab()
        _check_task_id(self.task_id)
        cfg = parse_env_cfg(self.task_id, device=device, num_envs=num_envs, overrides=[f"physics={physics}"])
        cfg.compute_final_obs = True  # extras["final_obs"]: the terminal observation, for bootstrapping
        cfg.seed = seed
        if configure is not None:
            configure(cfg)
        check_assets(cfg, self.task_id)
        self.cfg = cfg
        self.gym_env = gymnasium.make(self.task_id, cfg=cfg)
        self.env = self.gym_env.unwrapped  # ManagerBasedRLEnv | DirectRLEnv
        e = self.env
        self.num_envs = num_envs
        self.seed = seed
        self.device = torch.device(str(e.device))
        self.control_dt = float(e.step_dt)
        self.max_episode_steps = int(e.max_episode_length)
        obs_space = e.single_observation_space
        groups = list(obs_space.spaces) if hasattr(obs_space, "spaces") else []
        if "policy" not in groups:
            self.close()
            raise EnvError(f"Isaac Lab task {self.task_id} has no 'policy' observation group (groups: {groups})")
        self.has_critic_group = "critic" in groups
        self.obs_dim = int(sum(math.prod(s.shape) for s in _leaf_spaces(obs_space["policy"])))
        self.critic_obs_dim = (int(sum(math.prod(s.shape) for s in _leaf_spaces(obs_space["critic"])))
                               if self.has_critic_group else self.obs_dim)
        act_space = e.single_action_space
        self.action_dim = int(act_space.shape[0]) if getattr(act_space, "shape", None) else 0
        try:
            low, high = _box_bounds(act_space, self.task_id)
        except EnvError:
            self.close()
            raise
        scaled = torch.isfinite(low) & torch.isfinite(high)
        self._center = torch.where(scaled, (high + low) / 2, 0.0).to(self.device, torch.float32)  # [A]
        self._half = torch.where(scaled, (high - low) / 2, 1.0).to(self.device, torch.float32)  # [A]
        self.spec, self.spec_note = derive_robot_spec(self)
        self.episode_return = torch.zeros(num_envs, dtype=torch.float64, device=self.device)  # [N]
        self.episode_step = torch.zeros(num_envs, dtype=torch.long, device=self.device)  # [N]
        self._obs: dict[str, torch.Tensor] | None = None
        self._seeded = False
        self._closed = False

    # ---- BatchedEnvProtocol ---------------------------------------------------------------
    def reset(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Reset every env. Without a seed the first reset uses the constructor's seed."""
        if seed is None and not self._seeded:
            seed = self.seed
        obs, _ = self.gym_env.reset(seed=seed)
        self._seeded = True
        self.episode_return.zero_()
        self.episode_step.zero_()
        self._obs = self._wrap_obs(obs)
        return self._obs

    def step(self, action: torch.Tensor):
        """action [N, action_dim] in [-1, 1] -> (obs, reward [N], terminated [N], truncated [N], info)."""
        if self._obs is None:
            raise EnvError("call reset() before step()")
        a = self._check_action(action)
        obs, reward, terminated, truncated, extras = self.gym_env.step(self._center + self._half * a)
        terminated = terminated.to(self.device, torch.bool).reshape(self.num_envs)
        truncated = truncated.to(self.device, torch.bool).reshape(self.num_envs) & ~terminated
        reward = torch.nan_to_num(reward.to(self.device, torch.float32).reshape(self.num_envs),
                                  nan=0.0, posinf=0.0, neginf=0.0)
        self.episode_return += reward
        self.episode_step += 1
        next_obs = self._wrap_obs(obs)
        done = terminated | truncated
        info: dict[str, Any] = {"log": {"reward_terms": {}},
                                "diverged": torch.zeros(self.num_envs, dtype=torch.bool, device=self.device),
                                "diverged_total": 0}
        if bool(done.any()):
            if "final_obs" not in extras:
                raise EnvError(f"Isaac Lab task {self.task_id} ended episodes without extras['final_obs'] "
                               f"(compute_final_obs is not honoured by this env)")
            final = self._wrap_obs(extras["final_obs"])
            info["final_obs"] = {k: torch.where(done[:, None], final[k], next_obs[k]) for k in next_obs}
            ids = done.nonzero().squeeze(-1)
            info["episode"] = {"return": self.episode_return[ids].float(), "length": self.episode_step[ids].clone(),
                               "env_ids": ids}
            self.episode_return[ids] = 0
            self.episode_step[ids] = 0
        self._obs = next_obs
        return next_obs, reward, terminated, truncated, info

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if getattr(self, "gym_env", None) is not None:
            self.gym_env.close()

    # ---- evaluation in the same simulation ------------------------------------------------
    def first_envs(self, n: int) -> "FirstEnvsView":
        """A BatchedEnvProtocol view of envs [0, n) of this env (the others get zero actions): how
        the trainer evaluates, as Isaac Lab allows one simulation per process. Using it resets this
        env: the caller restarts its own episodes afterwards."""
        return FirstEnvsView(self, min(n, self.num_envs))

    # ---- internals -------------------------------------------------------------------------
    def _check_action(self, action) -> torch.Tensor:
        a = torch.as_tensor(action).to(self.device, torch.float32)
        if tuple(a.shape) != (self.num_envs, self.action_dim):
            raise EnvError(f"action has shape {tuple(a.shape)}, expected [num_envs={self.num_envs}, "
                           f"action_dim={self.action_dim}] for Isaac Lab task {self.task_id}")
        bad = ~torch.isfinite(a).all(dim=1)
        if bool(bad.any()):
            env_ids = bad.nonzero().squeeze(-1).tolist()
            raise EnvError(f"action contains NaN/Inf in env(s) {env_ids[:10]}{' ...' if len(env_ids) > 10 else ''}")
        return a.clamp(-1.0, 1.0)

    def _wrap_obs(self, obs: dict) -> dict[str, torch.Tensor]:
        """Isaac Lab's groups -> {"policy": [N, obs_dim], "critic": [N, critic_obs_dim]} (fresh copies:
        Isaac Lab reuses its buffers)."""
        policy = _flat_group(obs["policy"], "policy").to(self.device).clone()
        critic = _flat_group(obs["critic"], "critic").to(self.device).clone() if self.has_critic_group else policy.clone()
        return {"policy": policy, "critic": critic}


def _leaf_spaces(space: Any) -> list:
    return [s for sub in space.spaces.values() for s in _leaf_spaces(sub)] if hasattr(space, "spaces") else [space]


class FirstEnvsView:
    """Envs [0, n) of an IsaacLabBatchedEnv as their own BatchedEnvProtocol (see first_envs)."""

    def __init__(self, base: IsaacLabBatchedEnv, n: int):
        self.base = base
        self.num_envs = n
        self.obs_dim, self.critic_obs_dim, self.action_dim = base.obs_dim, base.critic_obs_dim, base.action_dim
        self.max_episode_steps = base.max_episode_steps
        self.control_dt = base.control_dt
        self.spec = base.spec
        self.device = base.device

    def reset(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        return {k: v[: self.num_envs] for k, v in self.base.reset(seed=seed).items()}

    def step(self, action: torch.Tensor):
        full = torch.zeros(self.base.num_envs, self.action_dim, device=self.device)
        full[: self.num_envs] = torch.as_tensor(action).to(self.device, torch.float32)
        obs, reward, terminated, truncated, info = self.base.step(full)
        n = self.num_envs
        out: dict[str, Any] = {"log": info["log"], "diverged": info["diverged"][:n], "diverged_total": 0}
        if "final_obs" in info:
            out["final_obs"] = {k: v[:n] for k, v in info["final_obs"].items()}
            ep = info["episode"]
            keep = ep["env_ids"] < n
            if bool(keep.any()):
                out["episode"] = {k: v[keep] for k, v in ep.items()}
        return ({k: v[:n] for k, v in obs.items()}, reward[:n], terminated[:n], truncated[:n], out)

    def close(self) -> None:
        """The simulation belongs to the base env: nothing to close here."""


# =====================================================================================
# the robot spec an Isaac Lab task implies (export)
# =====================================================================================
# Isaac Lab observation term (mdp function name) -> s2r term (control/terms.py), where they compute
# the same quantity: joint_pos_rel = q - default_q, joint_vel_rel = qd - default_qd (default_qd = 0),
# base_ang_vel in the base frame, projected_gravity, last_action, the velocity command.
_OBS_TERM_MAP = {"joint_pos_rel": "joint_pos", "joint_vel_rel": "joint_vel", "base_ang_vel": "base_ang_vel",
                 "projected_gravity": "projected_gravity", "last_action": "last_action",
                 "generated_commands": "velocity_command", "base_lin_vel": "base_lin_vel"}
# Isaac Lab joint action cfg class -> s2r action type
_ACTION_TYPE_MAP = {"JointPositionActionCfg": "joint_position", "JointEffortActionCfg": "joint_torque"}


def derive_robot_spec(env: IsaacLabBatchedEnv) -> tuple[RobotSpec | None, str]:
    """The RobotSpec an Isaac Lab manager-based task implies, or None with the reason it cannot be
    derived: joints in action order (names, default pose, PD gains, limits), action type and scale,
    physics dt and decimation, and the policy observation layout mapped onto s2r's terms.

    s2r's spec describes a robot whose every spec joint is actuated by the action (action_dim =
    number of joints) and whose observation is a list of s2r terms; tasks outside that (direct
    workflow, underactuated, task-space actions, terms s2r does not define) get None and the reason."""
    try:
        return _derive(env), "derived from the Isaac Lab env config"
    except _SpecGapError as e:
        return None, f"no robot spec: {e}"


class _SpecGapError(Exception):
    pass


def _derive(env: IsaacLabBatchedEnv) -> RobotSpec:
    e, cfg = env.env, env.cfg
    if not hasattr(e, "action_manager") or not hasattr(e, "observation_manager"):
        raise _SpecGapError(f"{env.task_id} is a direct-workflow task (no action/observation managers to read)")
    terms = e.action_manager.active_terms
    if len(terms) != 1:
        raise _SpecGapError(f"{len(terms)} action terms {terms}; s2r's spec has one joint action")
    term_cfg = getattr(cfg.actions, terms[0])
    action_type = _ACTION_TYPE_MAP.get(type(term_cfg).__name__)
    if action_type is None:
        raise _SpecGapError(f"action term '{terms[0]}' is a {type(term_cfg).__name__}; s2r maps only "
                            f"{sorted(_ACTION_TYPE_MAP)}")
    robot = e.scene[term_cfg.asset_name]
    ids, names = robot.find_joints(term_cfg.joint_names, preserve_order=term_cfg.preserve_order)
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    all_names = list(robot.joint_names)
    if len(names) != len(all_names):
        missing = [n for n in all_names if n not in names]
        raise _SpecGapError(f"the action drives {len(names)} of the robot's {len(all_names)} joints (not "
                            f"actuated: {missing}); s2r's spec needs every spec joint actuated")
    if names != all_names:  # joint_pos_rel / joint_vel_rel follow the articulation's order
        raise _SpecGapError(f"the action's joint order {names} differs from the articulation's {all_names}")
    if action_type == "joint_position" and not term_cfg.use_default_offset:
        raise _SpecGapError("a joint position action without use_default_offset (s2r: target = default + scale * a)")
    if action_type == "joint_torque" and term_cfg.offset not in (0, 0.0):
        raise _SpecGapError(f"a joint effort action with offset {term_cfg.offset} (s2r: torque = scale * a)")
    scale = _per_joint(term_cfg.scale, names, "action scale")
    data = robot.data
    default = _row(data.default_joint_pos)
    limits = _row(data.joint_pos_limits)  # [nj, 2]
    vel_limits = _row(data.joint_vel_limits)
    effort_limits = _row(data.joint_effort_limits)
    stiffness, damping = _row(data.joint_stiffness), _row(data.joint_damping)
    joints = [JointSpec(name=n, default=float(default[i]), kp=float(stiffness[i]), kd=float(damping[i]),
                        range=(float(limits[i][0]), float(limits[i][1])), velocity_limit=float(vel_limits[i]),
                        torque_limit=float(effort_limits[i])) for n, i in zip(names, ids)]
    om = e.observation_manager
    if om.group_obs_concatenate.get("policy") is False:
        raise _SpecGapError("the policy observation group is not concatenated")
    obs_terms = []
    history = 1
    for term_name in om.active_terms["policy"]:
        tcfg = getattr(cfg.observations.policy, term_name)
        fn = getattr(tcfg.func, "__name__", str(tcfg.func))
        s2r_name = _OBS_TERM_MAP.get(fn)
        if s2r_name is None:
            raise _SpecGapError(f"policy observation term '{term_name}' ({fn}) has no s2r counterpart "
                                f"(mapped: {sorted(_OBS_TERM_MAP)})")
        if tcfg.modifiers:  # (noise is a training-time corruption: the robot's value is the clean one)
            raise _SpecGapError(f"policy observation term '{term_name}' has modifiers {tcfg.modifiers}")
        params = tcfg.params or {}
        asset_cfg = params.get("asset_cfg")
        if asset_cfg is not None and getattr(asset_cfg, "joint_names", None) not in (None, ".*", [".*"]):
            raise _SpecGapError(f"policy observation term '{term_name}' reads joints {asset_cfg.joint_names}, "
                                f"not all joints")
        h = int(tcfg.history_length or 1)
        if obs_terms and h != history:
            raise _SpecGapError("policy observation terms have different history lengths")
        history = h
        dim = int(math.prod(om.group_obs_term_dim["policy"][len(obs_terms)])) // h
        clip = tcfg.clip[1] if tcfg.clip is not None else 100.0
        obs_terms.append(ObsTerm(name=s2r_name, dim=dim, scale=float(tcfg.scale) if tcfg.scale is not None else 1.0,
                                 clip=float(clip)))
    spec = RobotSpec(name=f"isaaclab-{env.task_id}", joints=joints, physics_dt=float(cfg.sim.dt),
                     decimation=int(cfg.decimation),
                     action=ActionSpec(type=action_type, scale=scale if len(set(scale)) > 1 else scale[0]),
                     observation=ObservationSpec(terms=obs_terms, history_length=history,
                                                 history_order="term_major" if history > 1 else "frame_major"))
    try:
        spec.validate()
    except ValueError as err:
        raise _SpecGapError(str(err)) from None
    return spec


def _row(x: Any) -> list:
    """Env 0's row of an Isaac Lab data buffer (warp array wrapper or tensor) as nested lists."""
    t = x.torch if hasattr(x, "torch") else x
    return t[0].detach().cpu().tolist()


def _per_joint(value: Any, names: list[str], what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * len(names)
    if isinstance(value, dict):
        import re

        out = []
        for n in names:
            hits = [v for pat, v in value.items() if re.fullmatch(pat, n)]
            if not hits:
                raise _SpecGapError(f"{what}: joint '{n}' matches no entry of {value}")
            out.append(float(hits[0]))
        return out
    raise _SpecGapError(f"{what} {value!r} is neither a number nor a per-joint mapping")


__all__ = ["IsaacLabBatchedEnv", "FirstEnvsView", "derive_robot_spec", "ensure_asset_root", "build_local_asset_root",
           "check_assets", "is_isaaclab_task", "isaaclab_task_id", "isaaclab_task_ids", "PREFIX", "INSTALL_HINT"]

"""What drives: the off-policy trainer over the batched env API.

One loop for every algorithm and env (s2r tasks and gymnasium ids alike):

    act (random before learning_starts unless init_from, else the policy on normalised obs)
    -> env.step over all envs -> store the transition (final_obs where an episode ended)
    -> update observation normalisers (until learning_starts with freeze_obs_norm)
    -> `updates_per_step` gradient updates on sampled batches
    -> log, evaluate, checkpoint

Runs are directories: config.yaml, checkpoints/ckpt_<env steps>.pt (atomic; the
newest one that verifies is used by --resume; each carries the robot spec), tb/ (TensorBoard),
eval.csv and learning_curve.png. A NaN in a loss stops the run with the step and the term
named, keeping the last good checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import yaml

from s2r.io import atomic_write_bytes, atomic_write_text
from s2r.policies.algorithms import AgentConfig, algo_defaults, make_agent
from s2r.policies.checkpoint import (SPEC_HASH_KEY, SPEC_KEY, SPEC_SOURCE_KEY, CheckpointError, latest_checkpoint,
                                     load_checkpoint, prune_checkpoints, rng_state, save_checkpoint, set_rng_state)
from s2r.policies.env_protocol import BatchedEnvProtocol
from s2r.policies.normalizer import ReturnScale, RunningNorm
from s2r.policies.replay import ReplayBuffer


class TrainingError(RuntimeError):
    """The run cannot continue (NaN loss, bad resume); the message says where and what is kept."""


@dataclass
class TrainConfig:
    task: str = "Pendulum-v1"  # s2r task name or gymnasium id
    algo: str = "sac"
    policy: str = "gaussian"
    backend: str = "mujoco"
    spec: str | None = None
    num_envs: int = 1
    total_steps: int = 20_000  # env steps summed over all envs
    learning_starts: int = 1_000  # env steps of uniform-random actions first
    batch_size: int = 256
    updates_per_step: float = 1.0  # gradient updates per vectorised env step (UTD x num_envs)
    buffer_size: int = 1_000_000
    n_step: int = 1
    normalize_obs: bool = True
    freeze_obs_norm: bool = False  # stop updating the normalisers at learning_starts (warm-up statistics kept)
    # floor on the normaliser's scale: a dim is divided by max(std, obs_norm_min_std), so dims with a small
    # spread are centred but not amplified (0: every dim to unit variance). 1 is the generic setting: on
    # Walker2d-v5 full scaling lost its early peak, the floor kept more of it; HalfCheetah/Hopper level
    obs_norm_min_std: float = 1.0
    # cap on that scale (None: none): obs_norm_min_std = obs_norm_max_std = 1 centres the observations, scales none;
    # the generic setting (policies/recipes.py, GENERIC) caps it at 3
    obs_norm_max_std: float | None = None
    reward_scale: float = 1.0  # multiplies rewards stored for learning (evaluation reports raw returns)
    # divide learning rewards by the running std of the discounted return, so that a constant reward factor does
    # not change learning (policies/normalizer.py ReturnScale); off by default: the recipes were tuned without it
    reward_norm: bool = False
    # stop updating that std at learning_starts: one scale for the whole run, still scale-free (the warm-up's
    # returns carry the task's factor too) but stationary, so the critic's targets do not shift as returns grow
    freeze_reward_norm: bool = False
    # the return std that reward_norm brings returns to: learning rewards are r * reward_norm_std / std(G). With 1,
    # rewards end up 10-30x smaller than raw on the Gymnasium locomotion tasks, where the temperature's fixed
    # initial value then outweighs them (docs/BENCHMARKS.md); still scale-free for any value
    reward_norm_std: float = 1.0
    eval_every: int = 5_000  # env steps
    eval_every_s: float | None = None  # also evaluate after this many wall seconds (return curves over time)
    eval_episodes: int = 5
    checkpoint_every: int = 10_000
    keep_checkpoints: int = 3
    checkpoint_buffer: bool = False  # include the replay buffer (large) for exact resumption
    log_every: int = 1_000
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads (2-core machine: 1 leaves a core for MuJoCo)
    progress: bool = True
    max_wall_s: float | None = None  # stop after this many seconds of train() (a fixed wall-clock budget)
    agent: AgentConfig = field(default_factory=AgentConfig)
    env_overrides: dict[str, Any] = field(default_factory=dict)  # EnvConfig fields for s2r tasks
    # start from this run's newest checkpoint (weights, Adam moments, normalisers; not its step count or
    # buffer): further training of a policy, e.g. on a shifted robot. The policy acts from the first step.
    init_from: str | None = None


def config_to_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: dict) -> TrainConfig:
    """config_to_dict's inverse; ValueError naming the field for unknown or malformed entries."""
    if not isinstance(d, dict):
        raise ValueError(f"a training config is a mapping of TrainConfig fields, got a {type(d).__name__}")
    d = dict(d)
    agent_d = d.pop("agent", None) or {}
    if not isinstance(agent_d, dict):
        raise ValueError(f"training config field 'agent' must be a mapping, got a {type(agent_d).__name__}")
    agent_known = {f.name for f in dataclasses.fields(AgentConfig)}
    unknown = set(agent_d) - agent_known
    if unknown:
        raise ValueError(f"unknown agent config field(s) {sorted(unknown)}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown training config field(s) {sorted(unknown)}")
    agent = AgentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in agent_d.items()})
    return TrainConfig(agent=agent, **d)


def parse_setting(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, value), the value read as YAML (3, 1e-3, true, null, [64, 64]); ValueError if malformed.
    The one parser for settings given on a command line (`s2r train --set`, bench/learning.py --variant)."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ValueError(f"{item!r} is not KEY=VALUE")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"{item!r}: the value is not a number, true/false, null, a string or a [list]") from None
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key, tuple(value) if isinstance(value, list) else value


# a field's annotation (a string: `from __future__ import annotations`) -> the Python types its values may have
_ANNOTATION_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),),
                     "tuple": (tuple,), "dict": (dict,)}


def _check_setting(where: str, annotation: str, value: Any) -> Any:
    """value, if the annotation allows it (an int where a float goes becomes a float); ValueError otherwise."""
    names = {part.strip().split("[")[0] for part in annotation.split("|")}
    allowed = tuple(t for n in names for t in _ANNOTATION_TYPES.get(n, ()))
    if (isinstance(value, bool) and "bool" not in names) or not isinstance(value, allowed):
        raise ValueError(f"{where} takes {annotation}, got {value!r} ({type(value).__name__})")
    if isinstance(value, int) and not isinstance(value, bool) and "int" not in names:
        return float(value)
    return value


# fields a setting may not change: they name the run (and the algorithm's networks) or have their own options
_NOT_SETTINGS = {"task": "the task is --task", "algo": "the algorithm is --algo", "policy": "the head is --policy",
                 "agent": "set agent fields one by one: agent.<field>=VALUE",
                 "env_overrides": "shift the task with --env-override", "agent.algo": "the algorithm is --algo",
                 "agent.policy": "the head is --policy", "init_from": "start from a run with --init-from"}


def apply_settings(cfg: TrainConfig, settings: dict[str, Any]) -> TrainConfig:
    """cfg with TrainConfig fields (and `agent.<field>` for AgentConfig) set; each value checked against its
    field's type. ValueError naming the key for unknown fields and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    agent_fields = {f.name: f for f in dataclasses.fields(AgentConfig)}
    for key, value in settings.items():
        if key in _NOT_SETTINGS:
            raise ValueError(f"setting {key!r}: {_NOT_SETTINGS[key]}")
        prefix = "agent." if key.startswith("agent.") else ""
        target, table = (cfg.agent, agent_fields) if prefix else (cfg, fields)
        name = key[len(prefix):]
        if name not in table:
            names = sorted(prefix + n for n in table if prefix + n not in _NOT_SETTINGS)
            raise ValueError(f"unknown setting {key!r}: {type(target).__name__} has no field {name!r} "
                             f"(settings: {', '.join(names)})")
        setattr(target, name, _check_setting(f"setting {key!r}", str(table[name].type), value))
    return cfg


def load_train_config(path: str | os.PathLike) -> TrainConfig:
    """A run's config.yaml; ValueError saying what is wrong with the file (missing, empty, not YAML)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path} not found (not a run directory)") from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ValueError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if d is None:
        raise ValueError(f"{path} is empty: a run's config.yaml holds its training config (written by s2r train)")
    try:
        return config_from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the first setting that cannot train: counts and intervals must be positive,
    the device one torch knows and has."""
    for name in ("num_envs", "total_steps", "batch_size", "buffer_size", "n_step", "eval_every",
                 "eval_episodes", "checkpoint_every", "keep_checkpoints", "log_every"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"training setting {name} must be a whole number >= 1, got {v!r}")
    if isinstance(cfg.learning_starts, bool) or not isinstance(cfg.learning_starts, int) or cfg.learning_starts < 0:
        raise ValueError(f"training setting learning_starts must be a whole number >= 0, got {cfg.learning_starts!r}")
    if not (isinstance(cfg.updates_per_step, (int, float)) and 0 <= cfg.updates_per_step < math.inf):
        raise ValueError(f"training setting updates_per_step must be a finite number >= 0, "
                         f"got {cfg.updates_per_step!r}")
    if not (isinstance(cfg.obs_norm_min_std, (int, float)) and not isinstance(cfg.obs_norm_min_std, bool)
            and 0 <= cfg.obs_norm_min_std < math.inf):
        raise ValueError(f"training setting obs_norm_min_std must be a finite number >= 0, "
                         f"got {cfg.obs_norm_min_std!r}")
    cap = cfg.obs_norm_max_std
    if cap is not None and not (isinstance(cap, (int, float)) and not isinstance(cap, bool)
                                and 0 < cap < math.inf and cap >= cfg.obs_norm_min_std):
        raise ValueError(f"training setting obs_norm_max_std must be a finite number > 0 and >= obs_norm_min_std "
                         f"({cfg.obs_norm_min_std}), or unset; got {cap!r}")
    for name in ("eval_every_s", "max_wall_s"):
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf):
            raise ValueError(f"training setting {name} must be a number of seconds > 0 (or unset), got {v!r}")
    if not (isinstance(cfg.reward_norm_std, (int, float)) and not isinstance(cfg.reward_norm_std, bool)
            and 0 < cfg.reward_norm_std < math.inf):
        raise ValueError(f"training setting reward_norm_std must be a finite number > 0, got {cfg.reward_norm_std!r}")
    if cfg.freeze_reward_norm and not cfg.reward_norm:
        raise ValueError("training setting freeze_reward_norm needs reward_norm=true (there is no scale to freeze)")
    check_device(cfg.device)


def check_device(device: str) -> None:
    """ValueError unless `device` is 'cpu', or 'cuda' / 'cuda:N' on a machine with that GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported for training: use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_env_for(cfg: TrainConfig, num_envs: int, seed: int, eval_mode: bool = False) -> BatchedEnvProtocol:
    """The run's env (training, or evaluation: same task distribution, its own seed): s2r's
    BatchedEnv for an s2r task, IsaacLabBatchedEnv for isaaclab:<task id> (simulated on cfg.device),
    GymnasiumBatchedEnv for a gymnasium id."""
    from s2r.sim.gym import make_env
    from s2r.sim.isaaclab import is_isaaclab_task
    from s2r.sim.tasks import TASKS

    kw: dict[str, Any] = {"seed": seed}
    if is_isaaclab_task(cfg.task):
        kw.update(device=cfg.device, **cfg.env_overrides)  # env_overrides: e.g. physics
    elif cfg.task in TASKS:
        kw.update(backend=cfg.backend, spec=cfg.spec, device=cfg.device if cfg.backend == "warp" else "cpu",
                  **cfg.env_overrides)
    return make_env(cfg.task, num_envs, **kw)


EnvFactory = Callable[[int, int], BatchedEnvProtocol]  # (num_envs, seed) -> env


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, resume: bool = False,
                 make_env: EnvFactory | None = None, make_eval_env: EnvFactory | None = None):
        """make_env / make_eval_env: build the training / evaluation envs instead of cfg.task's (e.g. a
        world model's ImaginedEnv to learn in, the target system to evaluate on; world_models/dyna.py)."""
        check_config(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world = _world()
        torch.set_num_threads(max(1, cfg.threads))
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed + 1000 * self.rank)
        if cfg.num_envs % self.world:
            raise TrainingError(f"num_envs {cfg.num_envs} is not divisible by the {self.world} ranks")
        self.local_envs = cfg.num_envs // self.world
        self.make_eval_env = make_eval_env or (lambda n, seed: make_env_for(cfg, n, seed=seed, eval_mode=True))
        self.env: BatchedEnvProtocol = (make_env or (lambda n, seed: make_env_for(cfg, n, seed)))(
            self.local_envs, cfg.seed + 1000 * self.rank)
        # Isaac Lab allows one simulation per process: evaluation runs in the first envs of the
        # training env, and the training episodes restart afterwards (_restart_after_eval)
        from s2r.sim.isaaclab import is_isaaclab_task

        self.eval_in_training_env = is_isaaclab_task(cfg.task) and make_env is None
        self.spec_hash = self.env.spec.hash() if self.env.spec is not None else None
        e = self.env
        self.agent = make_agent(cfg.agent, e.obs_dim, e.critic_obs_dim, e.action_dim, self.device)
        bounds = dict(min_std=cfg.obs_norm_min_std, max_std=cfg.obs_norm_max_std)
        self.obs_norm = RunningNorm(e.obs_dim, self.device, **bounds)
        self.critic_norm = RunningNorm(e.critic_obs_dim, self.device, **bounds)
        self.return_scale = ReturnScale(self.local_envs, cfg.agent.gamma, self.device, target_std=cfg.reward_norm_std)
        self.buffer = ReplayBuffer(cfg.buffer_size // self.world, self.local_envs, e.obs_dim, e.critic_obs_dim,
                                   e.action_dim, self.device, n_step=cfg.n_step, gamma=cfg.agent.gamma)
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 7 + 1000 * self.rank)
        self.env_steps = 0  # global env steps (all ranks)
        self.n_updates = 0
        self.eval_history: list[dict] = []
        self._update_debt = 0.0
        self.writer = None
        if _is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "checkpoints").mkdir(exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                self.writer = None
        if resume:
            self._resume()
        elif cfg.init_from is not None:
            self._init_from(Path(cfg.init_from))
        self._written_config: dict | None = None
        self._write_config()  # after a resume succeeded: it may have changed total_steps

    def _write_config(self) -> None:
        """config.yaml as the run trains now; rewritten only when the config changed (a caller that raised
        total_steps to train on, as world_models/dyna.py's rounds do)."""
        d = config_to_dict(self.cfg)
        if _is_main() and d != self._written_config:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(d, sort_keys=False))
            self._written_config = d

    # ---- checkpoints ----------------------------------------------------------------
    def _payload(self) -> dict:
        spec = self.env.spec
        p = {
            "format": "s2r-train-v1", "task": self.cfg.task,
            SPEC_HASH_KEY: self.spec_hash or "", SPEC_KEY: json.dumps(spec.to_dict()) if spec is not None else None,
            SPEC_SOURCE_KEY: spec.source if spec is not None else None,
            "algo": self.cfg.algo, "policy": self.cfg.policy, "config": config_to_dict(self.cfg),
            "env_steps": self.env_steps, "n_updates": self.n_updates,
            "agent": self.agent.state_dict(),
            "optim": self.agent.optim_state_dict(),
            "obs_norm": self.obs_norm.state_dict(), "critic_norm": self.critic_norm.state_dict(),
            "rng": rng_state(), "gen": self.gen.get_state(),
            "eval_history": json.dumps(self.eval_history),
            "obs_dim": self.env.obs_dim, "critic_obs_dim": self.env.critic_obs_dim, "action_dim": self.env.action_dim,
        }
        if self.cfg.reward_norm:
            p["return_scale"] = self.return_scale.state_dict()
        if self.cfg.checkpoint_buffer:
            p["buffer"] = self.buffer.state_dict()
        return p

    def save(self) -> Path | None:
        if not _is_main():
            return None
        path = self.run_dir / "checkpoints" / f"ckpt_{self.env_steps:09d}.pt"
        save_checkpoint(path, self._payload())
        prune_checkpoints(self.run_dir, keep=self.cfg.keep_checkpoints)
        self.last_checkpoint = path
        return path

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise TrainingError(f"--resume: no valid checkpoint in {self.run_dir / 'checkpoints'}")
        ck = load_checkpoint(path, expected_spec=self.env.spec, map_location=self.device)
        self.load_payload(ck)
        if self.env_steps >= self.cfg.total_steps:
            raise TrainingError(f"--resume: the run in {self.run_dir} has done {self.env_steps} env steps of its "
                                f"total_steps {self.cfg.total_steps}; nothing to continue (give --steps above "
                                f"{self.env_steps} to extend it)")
        self.last_checkpoint = path

    def _init_from(self, run: Path) -> None:
        """Weights, Adam moments and normalisers of another run's newest checkpoint; this run's own step
        count, buffer and history start at zero. Spec and layout must match."""
        path = latest_checkpoint(run)
        if path is None:
            raise TrainingError(f"init_from: no valid checkpoint in {run / 'checkpoints'} (not a training run?)")
        ck = load_checkpoint(path, expected_spec=self.env.spec, map_location=self.device)
        if (ck.get("algo"), ck.get("policy")) != (self.cfg.algo, self.cfg.policy):
            raise TrainingError(f"init_from {path}: trained as {ck.get('algo')}/{ck.get('policy')}, this run is "
                                f"{self.cfg.algo}/{self.cfg.policy}")
        self._load_weights(ck)

    def _load_weights(self, ck: dict) -> None:
        for k in ("obs_dim", "critic_obs_dim", "action_dim"):
            if int(ck[k]) != getattr(self.env, k):
                raise CheckpointError(f"checkpoint {k} = {int(ck[k])} but the env has {getattr(self.env, k)}: "
                                      f"it was trained for another observation/action layout")
        self.agent.load_state_dict(ck["agent"])
        self.agent.load_optim_state_dict(ck["optim"])
        self.obs_norm.load_state_dict(ck["obs_norm"])
        self.critic_norm.load_state_dict(ck["critic_norm"])
        if self.cfg.reward_norm and "return_scale" in ck:  # the critic's values are in these units
            self.return_scale.load_state_dict(ck["return_scale"])

    def load_payload(self, ck: dict) -> None:
        self._load_weights(ck)
        set_rng_state(ck["rng"])
        self.gen.set_state(ck["gen"].cpu())
        self.env_steps = int(ck["env_steps"])
        self.n_updates = int(ck["n_updates"])
        self.eval_history = json.loads(ck["eval_history"])
        if "buffer" in ck:
            self.buffer.load_state_dict(ck["buffer"])

    # ---- acting -------------------------------------------------------------------------
    def _norm(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        p = obs["policy"].to(self.device)
        c = obs["critic"].to(self.device)
        if not self.cfg.normalize_obs:
            return p, c
        return self.obs_norm.normalize(p), self.critic_norm.normalize(c)

    def _act(self, obs) -> torch.Tensor:
        if self.env_steps < self.cfg.learning_starts and self.cfg.init_from is None:
            return torch.rand(self.local_envs, self.env.action_dim, generator=self.gen).to(self.device) * 2 - 1
        return self.agent.act(self._norm(obs)[0])

    # ---- learning -----------------------------------------------------------------------
    def _learn(self) -> dict:
        stats: dict = {}
        self._update_debt += self.cfg.updates_per_step
        n = int(self._update_debt)
        self._update_debt -= n
        bad: dict[str, torch.Tensor] = {}  # term -> device flag: non-finite in any of these n updates
        first = self.n_updates + 1
        for _ in range(n):
            b = self.buffer.sample(self.cfg.batch_size, generator=self.gen)
            if self.cfg.normalize_obs:
                for k, norm in (("obs", self.obs_norm), ("next_obs", self.obs_norm),
                                ("critic_obs", self.critic_norm), ("next_critic_obs", self.critic_norm)):
                    b[k] = norm.normalize(b[k])
            if self.cfg.reward_norm:
                b["reward"] = self.return_scale.scale(b["reward"])
            stats = self.agent.update(b)
            self.n_updates += 1
            for name, v in stats.items():
                if isinstance(v, torch.Tensor):
                    nonfinite = ~torch.isfinite(v).all()
                    bad[name] = bad[name] | nonfinite if name in bad else nonfinite
        self._check_finite(bad, first)
        return stats

    def _check_finite(self, bad: dict[str, torch.Tensor], first: int) -> None:
        """One host sync per env step, not one per statistic and update: on a GPU each sync drains the
        queue and leaves it idle while Python launches the next update's kernels."""
        if not bad or not bool(torch.stack(list(bad.values())).any()):
            return
        names = ", ".join(k for k, v in bad.items() if bool(v))
        when = (f"at gradient update {first}" if first == self.n_updates
                else f"in gradient updates {first}-{self.n_updates}")
        kept = getattr(self, "last_checkpoint", None)
        raise TrainingError(f"non-finite {names} {when} (env step {self.env_steps}); stopping. "
                            f"Last good checkpoint: {kept or 'none yet'}")

    # ---- evaluation ---------------------------------------------------------------------
    def evaluate(self, episodes: int | None = None) -> dict:
        """Deterministic policy, `episodes` parallel envs, one episode each (evaluate.py: evaluate_policy)."""
        from s2r.policies.evaluate import evaluate_policy, policy_act

        episodes = episodes or self.cfg.eval_episodes
        seed = 10_000 + self.cfg.seed
        if self.eval_in_training_env:
            env = self.env.first_envs(episodes)  # min(episodes, num_envs) episodes
        else:
            env = self.make_eval_env(episodes, seed)
        try:
            act = policy_act(self.agent, self.obs_norm if self.cfg.normalize_obs else None, self.device)
            return {"env_steps": self.env_steps, **evaluate_policy(env, act, seed)}
        finally:
            env.close()

    # ---- the loop ------------------------------------------------------------------------
    def train(self, close_env: bool = True) -> dict:
        """Train to cfg.total_steps; -> the final evaluation. close_env=False keeps the training env open for a
        later train() with a larger total_steps (world_models/dyna.py's rounds)."""
        cfg = self.cfg
        self._write_config()
        obs = self.env.reset(seed=cfg.seed + 1000 * self.rank)
        ep_returns: list[float] = []
        t0, steps0, upd0 = time.perf_counter(), self.env_steps, self.n_updates
        bar = None
        if cfg.progress and _is_main():
            from tqdm import tqdm

            bar = tqdm(total=cfg.total_steps, initial=self.env_steps, unit="step", dynamic_ncols=True,
                       desc=f"{cfg.algo}/{cfg.policy} {cfg.task}")
        next_eval = (self.env_steps // cfg.eval_every + 1) * cfg.eval_every
        next_ckpt = (self.env_steps // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        next_log = self.env_steps + cfg.log_every
        stats: dict = {}
        last_eval = t0
        while self.env_steps < cfg.total_steps and not self._out_of_time(t0):
            action = self._act(obs)
            next_obs, reward, term, trunc, info = self.env.step(action)
            done = term | trunc
            real_next = next_obs
            if done.any():
                real_next = {k: torch.where(done[:, None], info["final_obs"][k], next_obs[k]) for k in next_obs}
                ep_returns += info["episode"]["return"].tolist()
            learn_reward = reward.to(self.device) * cfg.reward_scale  # [local_envs]
            self.buffer.add(obs["policy"].to(self.device), obs["critic"].to(self.device), action.to(self.device),
                            learn_reward, real_next["policy"].to(self.device),
                            real_next["critic"].to(self.device), term.to(self.device), trunc.to(self.device))
            if cfg.reward_norm:
                self.return_scale.update(learn_reward, done.to(self.device))
                if self.world > 1:
                    self.return_scale.sync_()
            if cfg.normalize_obs and not self.obs_norm.frozen:
                self.obs_norm.update(obs["policy"].to(self.device))
                self.critic_norm.update(obs["critic"].to(self.device))
                if self.world > 1:
                    self.obs_norm.sync_()
                    self.critic_norm.sync_()
            obs = next_obs
            self.env_steps += cfg.num_envs
            if cfg.freeze_obs_norm and self.env_steps >= cfg.learning_starts and not self.obs_norm.frozen:
                self.obs_norm.freeze()  # from here on the same raw observation always maps to the same input
                self.critic_norm.freeze()
            if cfg.freeze_reward_norm and self.env_steps >= cfg.learning_starts and not self.return_scale.frozen:
                self.return_scale.freeze()  # the warm-up's scale, for every later update
            if bar is not None:
                bar.update(cfg.num_envs)
            if self.env_steps >= cfg.learning_starts and len(self.buffer) >= cfg.batch_size:
                stats = self._learn()
            if self.env_steps >= next_log and _is_main():
                next_log += cfg.log_every
                wall = time.perf_counter() - t0
                sps = (self.env_steps - steps0) / wall
                ups = (self.n_updates - upd0) / wall
                recent = sum(ep_returns[-20:]) / max(1, len(ep_returns[-20:])) if ep_returns else float("nan")
                self._log({**{f"train/{k}": v for k, v in stats.items()}, "perf/env_steps_per_s": sps,
                           "perf/updates_per_s": ups, "train/episode_return": recent})
                if bar is not None:
                    bar.set_postfix(sps=f"{sps:.0f}", ups=f"{ups:.0f}", ret=f"{recent:.1f}")
            step_due = self.env_steps >= next_eval
            if step_due or (cfg.eval_every_s is not None and time.perf_counter() - last_eval >= cfg.eval_every_s):
                if step_due:
                    next_eval += cfg.eval_every
                last_eval = time.perf_counter()
                if _is_main():
                    ev = self.evaluate()
                    ev["wall_s"] = time.perf_counter() - t0
                    self.eval_history.append(ev)
                    self._log({f"eval/{k}": v for k, v in ev.items() if k != "env_steps"})
                    self._write_eval()
                    if self.eval_in_training_env:
                        obs = self._restart_after_eval()
            if self.env_steps >= next_ckpt:
                next_ckpt += cfg.checkpoint_every
                self.save()
        if bar is not None:
            bar.close()
        final: dict = {}
        if _is_main():
            # the last step may have had its scheduled evaluation already: not twice at one step
            if self.eval_history and self.eval_history[-1]["env_steps"] == self.env_steps:
                final = self.eval_history[-1]
            else:
                final = self.evaluate()
                final["wall_s"] = time.perf_counter() - t0
                self.eval_history.append(final)
            self._write_eval()
            self.save()
            if self.writer is not None:
                self.writer.close()
        if close_env:
            self.env.close()
        return final

    def _restart_after_eval(self) -> dict[str, torch.Tensor]:
        """The evaluation ran in the training env and reset it: the stored episodes end at their
        last step (truncated, so they bootstrap) and new ones start."""
        self.buffer.end_episodes()
        return self.env.reset()

    def _out_of_time(self, t0: float) -> bool:
        """max_wall_s reached. With several ranks rank 0's clock decides, so all stop on the same step."""
        if self.cfg.max_wall_s is None:
            return False
        up = time.perf_counter() - t0 >= self.cfg.max_wall_s
        if self.world > 1:
            flag = torch.tensor(float(up), device=self.device)
            dist.broadcast(flag, 0)
            up = bool(flag.item())
        return up

    def _log(self, scalars: dict) -> None:
        if self.writer is None:
            return
        for k, v in scalars.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    for i, x in enumerate(v.flatten().tolist()):
                        self.writer.add_scalar(f"{k}/{i}", x, self.env_steps)
                    continue
                v = float(v)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, self.env_steps)

    def _write_eval(self) -> None:
        if not self.eval_history:
            return
        keys = sorted({k for e in self.eval_history for k in e})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.eval_history)
        atomic_write_text(self.run_dir / "eval.csv", buf.getvalue())
        plot_learning_curve(self.eval_history, self.run_dir / "learning_curve.png",
                            f"{self.cfg.algo}/{self.cfg.policy} on {self.cfg.task}")


def plot_learning_curve(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [h["env_steps"] for h in history]
    y = [h["return_mean"] for h in history]
    s = [h.get("return_std", 0.0) for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, y, marker="o")
    ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return (deterministic)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

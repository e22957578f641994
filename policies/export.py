"""Export a trained run's deterministic policy to ONNX for the robot, and prove the file acts like torch.

    s2r export runs/humanoid-walk-sac-gaussian-0 --out policy.onnx

Reads a run directory or a lone checkpoint file (policies/evaluate.py: load_run), builds
`DeterministicPolicy` = observation normaliser + actor's deterministic action, and writes one
ONNX file `obs [1, obs_dim] -> actions [1, action_dim]` that control/onnx_policy.py (the ROS
node's runtime) loads. The file carries `s2r.*` metadata: the robot spec the run was trained
with (joint names in order, default pose, gains, action type and scale, rates, observation
layout), taken from the checkpoint itself, and its hash, so the runtime refuses a robot whose
contract differs; and `s2r.content_sha256`, the hash of the graph and weights
(onnx_policy.content_sha256), so the runtime refuses a file altered after export.

Exporter: torch.onnx's TorchScript-based exporter (`dynamo=False`). In torch 2.13 it still
works (with a DeprecationWarning, silenced here); the torch.export-based default needs
the extra `onnxscript` package and buys nothing for a static MLP.

Every export verifies itself before anything is written: onnx.checker, then onnxruntime
(through OnnxPolicy, the robot's own code path) against torch on random observations
drawn around the normaliser's statistics (some far outside, to exercise the clip) and,
optionally (rollout_steps > 0), on observations recorded from a short rollout of the policy in
its own env. Above `atol` (1e-4) the export fails and no file is written. No simulator is built
unless that rollout is asked for, or the checkpoint predates embedded robot specs (then the
task's env supplies the spec, checked against the checkpoint's hash, and the report says so).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from s2r.control.onnx_policy import (INPUT_NAME, META_ACTION_DIM, META_ALGO, META_CONTENT_HASH, META_EXPORTER,
                                     META_OBS_DIM, META_POLICY_HEAD, META_RUN_ID, META_SPEC, META_SPEC_HASH,
                                     MIN_OPSET, NO_SPEC, OUTPUT_NAME, REQUIRED_METADATA, OnnxPolicy, PolicyFileError,
                                     content_sha256)
from s2r.control.spec import RobotSpec, check_spec_hash
from s2r.io import atomic_write_bytes
from s2r.policies.checkpoint import SPEC_KEY, embedded_spec
from s2r.policies.env_protocol import BatchedEnvProtocol
from s2r.policies.normalizer import RunningNorm

EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"
# the highest opset that exporter writes (20 in torch 2.5-2.13); a private constant, hence the fallback
MAX_OPSET = getattr(getattr(torch.onnx, "_constants", None), "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)


class ExportError(RuntimeError):
    """The exported graph does not reproduce the torch policy; nothing was written."""


class DeterministicPolicy(nn.Module):
    """raw obs [B, obs_dim] -> actions [B, act_dim] in (-1, 1), the policy the robot runs.

        x = clip((obs - mean) * inv_std, -clip, clip)    the training normaliser, explicit
        a = tanh(mean_head(x))                           Gaussian; PMOE: the most probable expert's

    The normaliser stays a subtract and a multiply rather than being folded into the first
    layer's weights: in float32 the folded form loses |mean|/std * 6e-8 (normalizer.py).
    mean and inv_std are computed exactly as RunningNorm.normalize does (float64, then cast).
    """

    def __init__(self, actor: nn.Module, obs_norm: RunningNorm | None = None):
        super().__init__()
        self.actor = copy.deepcopy(actor).float().eval().requires_grad_(False)
        self.normalize = obs_norm is not None
        self.clip = obs_norm.clip if obs_norm is not None else None
        if obs_norm is not None:
            self.register_buffer("obs_mean", obs_norm.mean.to(torch.float32))  # [obs_dim]
            self.register_buffer("obs_inv_std", obs_norm.inv_std.to(torch.float32))

    def forward(self, obs: Tensor) -> Tensor:
        x = obs
        if self.normalize:
            x = (obs - self.obs_mean) * self.obs_inv_std
            if self.clip is not None:
                x = x.clamp(-self.clip, self.clip)
        return self.actor.deterministic(x)


def to_onnx_bytes(policy: DeterministicPolicy, obs_dim: int, metadata: dict[str, str], opset: int = 17) -> bytes:
    """Trace `policy` at batch 1 into an ONNX model with `metadata` as metadata_props, checker-verified,
    stamped with its content hash (stamp_content_hash)."""
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is not supported: s2r policies need opset >= {MIN_OPSET}, and the "
                         f"TorchScript exporter of torch {torch.__version__} writes at most {MAX_OPSET}")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(policy, (torch.zeros(1, obs_dim),), buf, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset, do_constant_folding=True,
                          dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    model.producer_name, model.producer_version = "s2r", _s2r_version()
    model.doc_string = "s2r policy: raw observation -> action in [-1, 1] (normaliser inside the graph)"
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return stamp_content_hash(model)


def stamp_content_hash(model) -> bytes:
    """`model` (an onnx.ModelProto) serialized with metadata s2r.content_sha256 = content_sha256 of its
    graph and weights (an existing entry is replaced).

    The hash skips metadata_props (field 14), and the serializer writes fields in field-number
    order, so appending the entry leaves every other field's bytes as they were hashed; checked."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != META_CONTENT_HASH]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    digest = content_sha256(model.SerializeToString())
    model.metadata_props.add(key=META_CONTENT_HASH, value=digest)
    data = model.SerializeToString()
    if content_sha256(data) != digest:
        raise ExportError(f"adding {META_CONTENT_HASH} changed the bytes of the graph or weights "
                          f"(hash {digest} before, {content_sha256(data)} after); protobuf serializer bug?")
    return data


def restamp_onnx(path: str | os.PathLike) -> str:
    """Add s2r.content_sha256 in place to an s2r ONNX policy exported before s2r recorded it: the graph
    and weights are re-serialized unchanged (checked: the same content hash before and after) and the
    file is rewritten atomically. Returns the hash."""
    import onnx

    path = Path(path)
    data = path.read_bytes()
    model = onnx.load_from_string(data)
    missing = [k for k in REQUIRED_METADATA if k not in {p.key for p in model.metadata_props}]
    if missing:
        raise PolicyFileError(f"{path} lacks s2r metadata {missing}: not an s2r export, nothing to re-stamp")
    before = content_sha256(data)
    stamped = stamp_content_hash(model)
    if content_sha256(stamped) != before:
        raise ExportError(f"re-serializing {path} changed its graph or weights bytes; file left as it was")
    atomic_write_bytes(path, stamped)
    return before


def exporter_version(opset: int) -> str:
    import onnx

    return (f"s2r {_s2r_version()}; {EXPORTER}, torch {torch.__version__}, onnx {onnx.__version__}, "
            f"opset {opset}")


def export_onnx(run: str | Path, out_path: str | Path, opset: int = 17, n_random: int = 1000,
                recorded_obs: np.ndarray | None = None, rollout_steps: int = 0, atol: float = 1e-4,
                seed: int = 0) -> dict:
    """Export `run` (a run directory or checkpoint file) to `out_path`; returns the verification report.

    The robot spec comes from the checkpoint. recorded_obs [N, obs_dim]: extra observations to
    verify on; rollout_steps > 0 (and no recorded_obs) records that many steps of the policy acting
    in its own env (this builds the simulator).
    """
    from s2r.policies.evaluate import load_run

    out_path = Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"--out {out_path} is a directory; give a file name such as {out_path / 'policy.onnx'}")
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is not supported: s2r policies need opset >= {MIN_OPSET}, and the "
                         f"TorchScript exporter of torch {torch.__version__} writes at most {MAX_OPSET}")
    cfg, agent, obs_norm, ck, ckpt_path = load_run(run)
    obs_dim, act_dim, steps = int(ck["obs_dim"]), int(ck["action_dim"]), int(ck["env_steps"])
    policy = DeterministicPolicy(agent.actor, obs_norm if cfg.normalize_obs else None)

    # the robot spec the run was trained with: the checkpoint's own (older checkpoints: the task's)
    notes: list[str] = []
    spec_from = "checkpoint" if SPEC_KEY in ck else "env"
    spec: RobotSpec | None = embedded_spec(ck, ckpt_path) if spec_from == "checkpoint" else None
    if spec_from == "env":
        notes.append(f"checkpoint {ckpt_path} was saved by an older s2r without the robot spec inside: took the "
                     f"spec from task {cfg.task}'s env (checked against the checkpoint's spec hash); continue "
                     f"the run (s2r train --resume) to save checkpoints that export without an env")
    if spec_from == "env" or (recorded_obs is None and rollout_steps > 0):
        from s2r.policies.trainer import make_env_for

        env = make_env_for(dataclasses.replace(cfg, backend="mujoco", device="cpu"), 1, seed, eval_mode=True)
        try:
            if spec_from == "env":
                spec = env.spec
                if spec is not None:
                    check_spec_hash(ck.get("spec_hash"), spec, f"checkpoint {ckpt_path}")
            if env.obs_dim != obs_dim or env.action_dim != act_dim:
                raise ValueError(f"checkpoint {ckpt_path} expects obs {obs_dim} / action {act_dim}, but task "
                                 f"{cfg.task} now has {env.obs_dim} / {env.action_dim}")
            if recorded_obs is None and rollout_steps > 0:
                recorded_obs = rollout_observations(env, policy, rollout_steps, seed)
        finally:
            env.close()

    run_id = f"{ckpt_path.parent.parent.name}@{steps}"
    metadata = {
        META_SPEC_HASH: spec.hash() if spec is not None else NO_SPEC,
        META_SPEC: json.dumps(spec.to_dict()) if spec is not None else NO_SPEC,
        "s2r.spec_note": (f"robot spec '{spec.name}' from {Path(spec.source).name if spec.source else '?'}"
                          if spec is not None else f"task {cfg.task} (gymnasium or Isaac Lab): no robot spec"),
        META_ALGO: cfg.algo, META_POLICY_HEAD: cfg.policy, "s2r.task": cfg.task,
        META_RUN_ID: run_id,
        META_OBS_DIM: str(obs_dim), META_ACTION_DIM: str(act_dim),
        "s2r.obs_normalizer": (f"in graph: clip((obs - mean) / clamp(sqrt(var + {obs_norm.eps:g}), "
                               f"{obs_norm.min_std:g}, {obs_norm.max_std or math.inf:g}), "
                               f"-{obs_norm.clip:g}, {obs_norm.clip:g})" if policy.normalize else "none"),
        META_EXPORTER: exporter_version(opset),
    }
    data = to_onnx_bytes(policy, obs_dim, metadata, opset)

    runtime = OnnxPolicy(data, expected_spec=spec)  # also proves the metadata and content hash round-trip
    rng = np.random.default_rng(seed)
    std = torch.sqrt(obs_norm.var).numpy() if policy.normalize else np.ones(obs_dim)
    mean = obs_norm.mean.numpy() if policy.normalize else np.zeros(obs_dim)
    rand_obs = random_observations(mean, std, n_random, rng)
    err_random = max_abs_error(runtime, policy, rand_obs)
    err_recorded = max_abs_error(runtime, policy, recorded_obs) if recorded_obs is not None else None
    for name, err in (("random", err_random), ("recorded", err_recorded)):
        if err is not None and not err <= atol:  # `not <=` also catches NaN
            raise ExportError(f"ONNX export of {ckpt_path} does not match torch: max |action error| {err:.3g} on "
                              f"{name} observations exceeds {atol:g}; no file written to {out_path}")
    atomic_write_bytes(out_path, data)
    n_params = sum(p.numel() for p in policy.actor.parameters())
    return {
        "path": str(out_path), "run_id": run_id, "checkpoint": str(ckpt_path), "task": cfg.task,
        "algo": cfg.algo, "policy_head": cfg.policy, "spec_hash": metadata[META_SPEC_HASH], "spec_from": spec_from,
        "content_sha256": runtime.metadata[META_CONTENT_HASH], "opset": opset,
        "exporter": EXPORTER, "max_abs_err_random": err_random, "n_random": len(rand_obs),
        "max_abs_err_recorded": err_recorded, "n_recorded": 0 if recorded_obs is None else len(recorded_obs),
        "tolerance": atol, "notes": notes,
        "sizes": {"obs_dim": obs_dim, "action_dim": act_dim, "actor_hidden": list(cfg.agent.actor_hidden),
                  "actor_params": n_params, "onnx_bytes": len(data)},
    }


# ---- verification ------------------------------------------------------------------------

def random_observations(mean: np.ndarray, std: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, dim] float32 around mean +- std; the first tenth 20-200 std out (past the normaliser's clip)."""
    z = rng.standard_normal((n, mean.shape[0]))
    n_far = max(1, n // 10)
    z[:n_far] *= rng.uniform(20.0, 200.0, size=(n_far, 1))
    std = np.where(std > 0, std, 1.0)  # constant dims (e.g. a fixed command) still get varied
    return (mean + std * z).astype(np.float32)


@torch.no_grad()
def rollout_observations(env: BatchedEnvProtocol, policy: DeterministicPolicy, steps: int,
                         seed: int = 0) -> np.ndarray:
    """[<=steps, obs_dim] float32 policy observations of env 0 while `policy` drives (auto-reset env)."""
    obs = env.reset(seed=seed)
    out = np.empty((steps, env.obs_dim), np.float32)
    for t in range(steps):
        p = obs["policy"].to("cpu", torch.float32)  # [num_envs, obs_dim]
        out[t] = p[0].numpy()
        obs = env.step(policy(p))[0]
    return out[np.isfinite(out).all(axis=1)]  # a diverged step (reset by the env) is not a test case


@torch.no_grad()
def max_abs_error(runtime: OnnxPolicy, policy: DeterministicPolicy, obs: np.ndarray) -> float:
    """max over obs [N, obs_dim] and action dims of |onnxruntime - torch|."""
    obs = np.asarray(obs, np.float32)
    if obs.ndim != 2 or obs.shape[1] != runtime.obs_dim:
        raise ValueError(f"observations to verify on must be [N, {runtime.obs_dim}], got {tuple(obs.shape)}")
    ref = policy(torch.from_numpy(obs)).numpy()  # [N, act_dim]
    got = np.stack([runtime(o).copy() for o in obs])
    return float(np.abs(got - ref).max())


def _s2r_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("s2r")
    except PackageNotFoundError:
        return "0+unknown"

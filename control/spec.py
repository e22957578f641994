"""The robot spec: the one contract between simulator, exporter and robot node.

A `RobotSpec` says, for one robot, what the policy's numbers mean: joint names
in policy order, default pose, PD gains, limits, action type and scale, the
physics/control rates and the observation layout. It is loaded from YAML (see
sim/robots/*/ *.yaml), and its `hash()` travels with every checkpoint, ONNX
file and recording so that a policy is never run against a robot whose
contract differs from the one it was trained on.

This module imports neither MuJoCo nor torch: the ROS node loads it on the robot.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HISTORY_ORDERS = ("frame_major", "term_major")
ACTION_TYPES = ("joint_position", "joint_torque", "ee_delta")


class SpecError(ValueError):
    """A robot spec (file or object) is malformed; the message names the field."""


@dataclass
class JointSpec:
    """One actuated joint, in policy order."""

    name: str
    default: float = 0.0  # rad (or m): the pose actions are offsets from
    kp: float = 0.0  # N m / rad, PD stiffness
    kd: float = 0.0  # N m s / rad, PD damping
    range: tuple[float, float] = (-math.inf, math.inf)  # position limits
    velocity_limit: float = math.inf  # rad/s
    torque_limit: float = math.inf  # N m


@dataclass
class GripperSpec:
    """A single-actuator gripper driven by an absolute opening command."""

    actuator: str
    open: float  # actuator ctrl when fully open
    closed: float  # actuator ctrl when fully closed


@dataclass
class ActionSpec:
    """How the policy's action vector (in [-1, 1]) becomes actuator commands."""

    type: str = "joint_position"  # one of ACTION_TYPES
    scale: float | list[float] = 1.0  # rad, N m or m per unit action
    ee_site: str | None = None  # ee_delta only: the controlled site
    gripper: GripperSpec | None = None  # ee_delta only: an extra last action channel


@dataclass
class ObsTerm:
    """One observation term: the value is clip(raw * scale, -clip, clip)."""

    name: str
    dim: int
    scale: float = 1.0
    clip: float = 100.0


@dataclass
class ObservationSpec:
    """Ordered terms plus history.

    frame_major: [t-H+1: all terms, ..., t: all terms]
    term_major:  [term1: t-H+1..t, term2: t-H+1..t, ...]
    """

    terms: list[ObsTerm] = field(default_factory=list)
    history_length: int = 1
    history_order: str = "frame_major"

    @property
    def frame_dim(self) -> int:
        return sum(t.dim for t in self.terms)

    @property
    def dim(self) -> int:
        return self.frame_dim * self.history_length

    def noise_amplitudes(self, obs_noise: dict[str, float]) -> list[float]:
        """term -> uniform noise amplitude in raw units => [frame_dim] amplitudes on the scaled frame
        (scale x amplitude: noise added after scaling). ValueError names terms the layout lacks."""
        unknown = set(obs_noise) - {t.name for t in self.terms}
        if unknown:
            raise ValueError(f"obs_noise names term(s) {sorted(unknown)} not in the robot spec's observation layout")
        return [obs_noise.get(t.name, 0.0) * t.scale for t in self.terms for _ in range(t.dim)]


@dataclass
class RobotSpec:
    name: str
    joints: list[JointSpec]
    physics_dt: float
    decimation: int
    action: ActionSpec = field(default_factory=ActionSpec)
    observation: ObservationSpec = field(default_factory=ObservationSpec)
    mjcf: str | None = None  # path (relative to the YAML file) or pkg://module/relpath
    base_body: str | None = None
    imu_site: str | None = None
    source: str | None = field(default=None, compare=False)  # where it was loaded from; not hashed

    # ---- derived -----------------------------------------------------------------
    @property
    def control_dt(self) -> float:
        return self.physics_dt * self.decimation

    @property
    def joint_names(self) -> list[str]:
        return [j.name for j in self.joints]

    @property
    def num_joints(self) -> int:
        return len(self.joints)

    @property
    def action_dim(self) -> int:
        if self.action.type == "ee_delta":
            return 3 + (1 if self.action.gripper is not None else 0)
        return self.num_joints

    def array(self, attr: str) -> list[float]:
        """Per-joint values in policy order, e.g. spec.array("kp")."""
        return [getattr(j, attr) for j in self.joints]

    def action_scale_vector(self) -> list[float]:
        s = self.action.scale
        if isinstance(s, (int, float)):
            n = 3 if self.action.type == "ee_delta" else self.num_joints
            return [float(s)] * n
        return [float(v) for v in s]

    def resolve_mjcf(self) -> Path:
        """Absolute path of the MJCF; pkg://module/rel resolves inside an installed package."""
        if self.mjcf is None:
            raise SpecError(f"robot spec '{self.name}' has no 'mjcf' path")
        if self.mjcf.startswith("pkg://"):
            import importlib

            mod_name, _, rel = self.mjcf[len("pkg://") :].partition("/")
            try:
                mod = importlib.import_module(mod_name)
            except ImportError as e:
                raise SpecError(f"robot spec '{self.name}': mjcf '{self.mjcf}' names package "
                                f"'{mod_name}', which is not installed") from e
            path = Path(mod.__file__).parent / rel
        else:
            path = Path(os.path.expanduser(self.mjcf))
            if not path.is_absolute() and self.source is not None:
                path = Path(self.source).parent / path
        if not path.is_file():
            raise SpecError(f"robot spec '{self.name}': MJCF file not found: {path}")
        return path

    # ---- the contract --------------------------------------------------------------
    def contract_dict(self) -> dict[str, Any]:
        """Everything a deployed policy depends on (not the MJCF path, not `source`)."""
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("mjcf")
        return d

    def hash(self) -> str:
        """Stable 16-hex-digit hash of the contract (sorted-key JSON, floats by repr)."""
        blob = json.dumps(_canonical(self.contract_dict()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = _canonical(dataclasses.asdict(self))
        d.pop("source")
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        from s2r.io import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> "RobotSpec":
        where = f" ({source})" if source else ""
        if not isinstance(d, dict):
            raise SpecError(f"robot spec{where} must be a mapping, got {type(d).__name__}")
        d = copy.deepcopy(d)
        try:
            joints_raw = d.pop("joints")
            name = d.pop("name")
            physics_dt = float(d.pop("physics_dt"))
            decimation = int(d.pop("decimation"))
        except KeyError as e:
            raise SpecError(f"robot spec{where} is missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise SpecError(f"robot spec{where}: physics_dt/decimation must be numbers: {e}") from None
        if not isinstance(joints_raw, list) or not joints_raw:
            raise SpecError(f"robot spec{where}: 'joints' must be a non-empty list")
        joints = [_joint_from(j, i, where) for i, j in enumerate(joints_raw)]
        action = _action_from(d.pop("action", {}) or {}, where)
        obs = _obs_from(d.pop("observation", {}) or {}, where)
        known = {"mjcf", "base_body", "imu_site"}
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"robot spec{where}: unknown field(s) {sorted(unknown)}")
        spec = cls(name=str(name), joints=joints, physics_dt=physics_dt, decimation=decimation,
                   action=action, observation=obs, mjcf=d.get("mjcf"), base_body=d.get("base_body"),
                   imu_site=d.get("imu_site"), source=source)
        spec.validate()
        return spec

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RobotSpec":
        """Load a spec YAML. A top-level `base: other.yaml` is loaded first and deep-merged."""
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"robot spec file not found: {path}")
        d = _load_yaml_with_base(path, seen=())
        return cls.from_dict(d, source=str(path.resolve()))

    def validate(self) -> None:
        where = f" '{self.name}'" + (f" ({self.source})" if self.source else "")
        if not (self.physics_dt > 0 and math.isfinite(self.physics_dt)):
            raise SpecError(f"robot spec{where}: physics_dt must be > 0, got {self.physics_dt}")
        if self.decimation < 1:
            raise SpecError(f"robot spec{where}: decimation must be >= 1, got {self.decimation}")
        names = self.joint_names
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SpecError(f"robot spec{where}: duplicate joint name(s) {sorted(dup)}")
        for j in self.joints:
            lo, hi = j.range
            if not lo < hi:
                raise SpecError(f"robot spec{where}: joint '{j.name}' range {j.range} is empty")
            if not lo <= j.default <= hi:
                raise SpecError(f"robot spec{where}: joint '{j.name}' default {j.default} "
                                f"outside its range {j.range}")
            for attr in ("kp", "kd", "velocity_limit", "torque_limit"):
                v = getattr(j, attr)
                if not v >= 0 or math.isnan(v):
                    raise SpecError(f"robot spec{where}: joint '{j.name}' {attr} must be >= 0, got {v}")
        a = self.action
        if a.type not in ACTION_TYPES:
            raise SpecError(f"robot spec{where}: action.type {a.type!r} not one of {ACTION_TYPES}")
        if a.type == "ee_delta" and not a.ee_site:
            raise SpecError(f"robot spec{where}: action.type ee_delta needs action.ee_site")
        if not isinstance(a.scale, (int, float)):
            want = 3 if a.type == "ee_delta" else self.num_joints
            if len(a.scale) != want:
                raise SpecError(f"robot spec{where}: action.scale has {len(a.scale)} entries, "
                                f"expected 1 or {want}")
        o = self.observation
        if o.history_order not in HISTORY_ORDERS:
            raise SpecError(f"robot spec{where}: observation.history_order {o.history_order!r} "
                            f"not one of {HISTORY_ORDERS}")
        if o.history_length < 1:
            raise SpecError(f"robot spec{where}: observation.history_length must be >= 1")
        tnames = [t.name for t in o.terms]
        dup = {n for n in tnames if tnames.count(n) > 1}
        if dup:
            raise SpecError(f"robot spec{where}: duplicate observation term(s) {sorted(dup)}")
        from s2r.control.terms import TERMS  # the one registry of observation terms

        for t in o.terms:
            if t.name not in TERMS:
                raise SpecError(f"robot spec{where}: unknown observation term '{t.name}' (known terms: "
                                f"{sorted(TERMS)}; each is defined once in s2r/control/terms.py)")
            want = TERMS[t.name].dim(self)
            if t.dim != want:
                raise SpecError(f"robot spec{where}: observation term '{t.name}' has dim {t.dim}, but this "
                                f"robot gives it {want}")
            if t.dim < 1:
                raise SpecError(f"robot spec{where}: observation term '{t.name}' dim must be >= 1")
            if not t.clip > 0:
                raise SpecError(f"robot spec{where}: observation term '{t.name}' clip must be > 0")


# ---- helpers ----------------------------------------------------------------------

def _canonical(x: Any) -> Any:
    """Tuples -> lists, floats stay floats (repr is shortest round-trip), inf -> 'inf'."""
    if isinstance(x, dict):
        return {k: _canonical(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canonical(v) for v in x]
    if isinstance(x, float):
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    return x


def _num(v: Any, what: str) -> float:
    if isinstance(v, str) and v.strip().lstrip("+-").lower() in ("inf", ".inf", "infinity"):
        return -math.inf if v.strip().startswith("-") else math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(f"{what} must be a number, got {v!r}")
    return float(v)


def _joint_from(j: Any, i: int, where: str) -> JointSpec:
    if not isinstance(j, dict) or "name" not in j:
        raise SpecError(f"robot spec{where}: joints[{i}] must be a mapping with a 'name'")
    known = {f.name for f in dataclasses.fields(JointSpec)}
    unknown = set(j) - known
    if unknown:
        raise SpecError(f"robot spec{where}: joint '{j['name']}' has unknown field(s) {sorted(unknown)}")
    w = f"robot spec{where}: joint '{j['name']}'"
    kw: dict[str, Any] = {"name": str(j["name"])}
    for k in ("default", "kp", "kd", "velocity_limit", "torque_limit"):
        if k in j:
            kw[k] = _num(j[k], f"{w} {k}")
    if "range" in j:
        r = j["range"]
        if not isinstance(r, (list, tuple)) or len(r) != 2:
            raise SpecError(f"{w} range must be [low, high], got {r!r}")
        kw["range"] = (_num(r[0], f"{w} range"), _num(r[1], f"{w} range"))
    return JointSpec(**kw)


def _action_from(a: dict, where: str) -> ActionSpec:
    if not isinstance(a, dict):
        raise SpecError(f"robot spec{where}: 'action' must be a mapping")
    unknown = set(a) - {"type", "scale", "ee_site", "gripper"}
    if unknown:
        raise SpecError(f"robot spec{where}: action has unknown field(s) {sorted(unknown)}")
    g = a.get("gripper")
    grip = None
    if g is not None:
        try:
            grip = GripperSpec(actuator=str(g["actuator"]), open=float(g["open"]), closed=float(g["closed"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"robot spec{where}: action.gripper needs actuator/open/closed ({e})") from None
    scale = a.get("scale", 1.0)
    if isinstance(scale, (list, tuple)):
        scale = [_num(s, f"robot spec{where}: action.scale") for s in scale]
    else:
        scale = _num(scale, f"robot spec{where}: action.scale")
    return ActionSpec(type=str(a.get("type", "joint_position")), scale=scale,
                      ee_site=a.get("ee_site"), gripper=grip)


def _obs_from(o: dict, where: str) -> ObservationSpec:
    if not isinstance(o, dict):
        raise SpecError(f"robot spec{where}: 'observation' must be a mapping")
    unknown = set(o) - {"terms", "history_length", "history_order"}
    if unknown:
        raise SpecError(f"robot spec{where}: observation has unknown field(s) {sorted(unknown)}")
    terms = []
    for i, t in enumerate(o.get("terms", []) or []):
        if not isinstance(t, dict) or "name" not in t or "dim" not in t:
            raise SpecError(f"robot spec{where}: observation.terms[{i}] needs 'name' and 'dim'")
        unknown = set(t) - {"name", "dim", "scale", "clip"}
        if unknown:
            raise SpecError(f"robot spec{where}: observation term '{t['name']}' has unknown "
                            f"field(s) {sorted(unknown)}")
        terms.append(ObsTerm(name=str(t["name"]), dim=int(t["dim"]),
                             scale=_num(t.get("scale", 1.0), f"term '{t['name']}' scale"),
                             clip=_num(t.get("clip", 100.0), f"term '{t['name']}' clip")))
    return ObservationSpec(terms=terms, history_length=int(o.get("history_length", 1)),
                           history_order=str(o.get("history_order", "frame_major")))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_yaml_with_base(path: Path, seen: tuple) -> dict:
    if path.resolve() in seen:
        raise SpecError(f"robot spec 'base:' chain loops at {path}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"robot spec {path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise SpecError(f"robot spec {path} must be a YAML mapping, got {type(d).__name__}")
    base = d.pop("base", None)
    if base is None:
        return d
    bpath = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if not bpath.is_file():
        raise SpecError(f"robot spec {path}: base file not found: {bpath}")
    merged = _deep_merge(_load_yaml_with_base(bpath, seen + (path.resolve(),)), d)
    # a relative mjcf in the base file stays relative to the base file
    if "mjcf" in merged and "mjcf" not in d and not str(merged["mjcf"]).startswith("pkg://"):
        mj = Path(merged["mjcf"])
        if not mj.is_absolute():
            merged["mjcf"] = str(os.path.relpath(bpath.parent / mj, path.parent))
    return merged


def check_spec_hash(expected: str | None, actual: str | RobotSpec, what: str,
                    expected_spec: dict[str, Any] | None = None) -> None:
    """The one robot-spec check: refuse to pair `what` (a checkpoint, an ONNX policy), made for the
    robot spec hashing to `expected`, with the spec in use (`actual`: the RobotSpec, or its hash).

    expected_spec: RobotSpec.to_dict() of the spec `what` was made for, when it carries one; with
    `actual` a RobotSpec the message then names the first concrete difference ("joint order
    differs at index 2: ..."). `expected` None, "" or "none": `what` was made for a task without a
    robot spec (a gymnasium id), and no robot spec matches it.
    """
    spec = actual if isinstance(actual, RobotSpec) else None
    actual_hash = spec.hash() if spec is not None else actual
    robot = ""
    if spec is not None:
        robot = f" '{spec.name}'" + (f" ({spec.source})" if spec.source else "")
    if expected in (None, "", "none"):
        raise SpecError(f"robot spec mismatch: {what} was made for a task without a robot spec (a gymnasium "
                        f"task); it cannot be paired with the robot spec in use{robot}, hash {actual_hash}")
    if expected == actual_hash:
        return
    made = f" ('{expected_spec.get('name')}')" if expected_spec else ""
    if expected_spec is not None and spec is not None:
        detail = (first_spec_difference(expected_spec, spec.to_dict())
                  or "no field differs (the hashes were computed by different s2r versions?)")
    else:
        detail = "joint order, gains, limits, rates or observation terms differ"
    raise SpecError(
        f"robot spec mismatch: {what} was made for robot spec hash {expected}{made}, but the robot spec in "
        f"use{robot} hashes to {actual_hash}; it was made for another robot spec / observation layout: "
        f"{detail}. Use the spec it was made with (`s2r sim info TASK` prints a task's), or retrain / "
        f"re-export for this one.")


def first_spec_difference(policy: dict[str, Any], robot: dict[str, Any]) -> str | None:
    """The first concrete difference between two RobotSpec.to_dict()s, in the order a deployer cares
    about (joints and their order, gains and limits, rates, action, observation layout), or None.
    `policy` is the spec an artefact was made for, `robot` the one in use."""
    pj = [j["name"] for j in policy.get("joints", [])]
    rj = [j["name"] for j in robot.get("joints", [])]
    if pj != rj:
        missing, extra = [n for n in pj if n not in rj], [n for n in rj if n not in pj]
        if missing or extra:
            parts = ([f"the robot lacks {missing}"] if missing else []) + ([f"the policy does not know {extra}"]
                                                                             if extra else [])
            return f"joint set differs (policy {len(pj)} joints, robot {len(rj)}): " + "; ".join(parts)
        i = next(k for k, (a, b) in enumerate(zip(pj, rj)) if a != b)
        return f"joint order differs at index {i}: policy has '{pj[i]}', robot has '{rj[i]}'"
    for p, r in zip(policy["joints"], robot["joints"]):
        for key in [*p, *(k for k in r if k not in p)]:  # field order: default, kp, kd, range, ...
            if p.get(key) != r.get(key):
                return f"{key} of '{p['name']}' differs: policy {_fmt(p.get(key))} vs robot {_fmt(r.get(key))}"
    for key in ("physics_dt", "decimation"):
        if policy.get(key) != robot.get(key):
            return f"{key} differs: policy {_fmt(policy.get(key))} vs robot {_fmt(robot.get(key))}"
    d = _diff(policy.get("action"), robot.get("action"), "action")
    if d:
        return d
    po, ro = policy.get("observation") or {}, robot.get("observation") or {}
    pt = [(t["name"], t["dim"]) for t in po.get("terms", [])]
    rt = [(t["name"], t["dim"]) for t in ro.get("terms", [])]
    if pt != rt:
        return f"observation term list differs: policy {_terms(pt)} vs robot {_terms(rt)}"
    for p, r in zip(po.get("terms", []), ro.get("terms", [])):
        d = _diff(p, r, f"observation term '{p['name']}'")
        if d:
            return d
    for key in ("history_length", "history_order"):
        if po.get(key) != ro.get(key):
            return f"observation {key} differs: policy {_fmt(po.get(key))} vs robot {_fmt(ro.get(key))}"
    skip = {"joints", "physics_dt", "decimation", "action", "observation", "mjcf"}  # mjcf is not in the hash
    for key in sorted((set(policy) | set(robot)) - skip):
        d = _diff(policy.get(key), robot.get(key), key)
        if d:
            return d
    return None


def _diff(p: Any, r: Any, where: str) -> str | None:
    if isinstance(p, dict) and isinstance(r, dict):
        for k in sorted(set(p) | set(r)):
            d = _diff(p.get(k), r.get(k), f"{where}.{k}")
            if d:
                return d
        return None
    return None if p == r else f"{where} differs: policy {_fmt(p)} vs robot {_fmt(r)}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v) if isinstance(v, str) else str(v)


def _terms(terms: list[tuple[str, int]]) -> str:
    return "[" + ", ".join(f"{n}({d})" for n, d in terms) + "]"

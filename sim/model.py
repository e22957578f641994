"""Compile a MuJoCo model from a robot spec plus the sensors a task declares.

The MJCF (the repo's own, or any file a user has, e.g. MuJoCo Menagerie's G1) is
loaded through `mujoco.MjSpec`; the spec's contract is then written into it:
physics timestep, PD gains and torque limits of each joint's actuator, and the
sensors the task needs (so observations and rewards come out of the simulator's
sensordata, vectorised over the batch, on both backends). Errors name the file
and the missing joint/site/actuator instead of surfacing from deep in MuJoCo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mujoco
import numpy as np

from s2r.control.spec import RobotSpec, SpecError

SENSOR_TYPES = {
    "framepos": (mujoco.mjtSensor.mjSENS_FRAMEPOS, 3),
    "framequat": (mujoco.mjtSensor.mjSENS_FRAMEQUAT, 4),
    "framezaxis": (mujoco.mjtSensor.mjSENS_FRAMEZAXIS, 3),
    "framelinvel": (mujoco.mjtSensor.mjSENS_FRAMELINVEL, 3),
    "gyro": (mujoco.mjtSensor.mjSENS_GYRO, 3),
    "velocimeter": (mujoco.mjtSensor.mjSENS_VELOCIMETER, 3),
    "accelerometer": (mujoco.mjtSensor.mjSENS_ACCELEROMETER, 3),
    "touch": (mujoco.mjtSensor.mjSENS_TOUCH, 1),
    "actuatorfrc": (mujoco.mjtSensor.mjSENS_ACTUATORFRC, 1),
}
OBJ_TYPES = {"site": mujoco.mjtObj.mjOBJ_SITE, "body": mujoco.mjtObj.mjOBJ_BODY,
             "xbody": mujoco.mjtObj.mjOBJ_XBODY, "actuator": mujoco.mjtObj.mjOBJ_ACTUATOR}


class ModelError(ValueError):
    """The MJCF does not fit the robot spec or the task; the message says where."""


@dataclass(frozen=True)
class SensorRequest:
    """A sensor a task needs: `type` on the named object; read back by `name`."""

    name: str
    type: str  # key of SENSOR_TYPES
    objname: str
    objtype: str = "site"


@dataclass
class ModelIndex:
    """Where the spec's joints, actuators and the task's sensors live in the compiled model."""

    joint_qpos: np.ndarray  # [nj] qpos address per spec joint (policy order)
    joint_dof: np.ndarray  # [nj] dof address per spec joint
    joint_act: np.ndarray  # [nj] actuator id per spec joint
    sensors: dict[str, slice] = field(default_factory=dict)  # name -> sensordata slice
    base_qpos: int | None = None  # qpos address of the free joint of the base body
    base_dof: int | None = None
    gripper_act: int | None = None
    free_joints: list[tuple[str, int, int]] = field(default_factory=list)  # (name, qposadr, dofadr)


def load_mjspec(spec: RobotSpec) -> mujoco.MjSpec:
    path = spec.resolve_mjcf()
    try:
        return mujoco.MjSpec.from_file(str(path))
    except Exception as e:  # MuJoCo raises ValueError with the parser message
        raise ModelError(f"malformed MJCF {path}: {e}") from None


def _find(items, name: str):
    for it in items:
        if it.name == name:
            return it
    return None


def compile_model(spec: RobotSpec, sensors: list[SensorRequest] = (),
                  joint_torque_sensors: bool = False) -> tuple[mujoco.MjModel, ModelIndex]:
    """Load the spec's MJCF, apply the contract, add task sensors, compile.

    joint_torque_sensors: add an `actuatorfrc` sensor `jnt_torque:<joint>` per spec joint: the torque its
    actuator applied in the last physics step (what a drive reports as effort).
    """
    ms = load_mjspec(spec)
    ms.option.timestep = spec.physics_dt
    where = f"MJCF {spec.resolve_mjcf()} (robot spec '{spec.name}')"

    joints = {j.name: j for j in ms.joints}
    missing = [j.name for j in spec.joints if j.name not in joints]
    if missing:
        raise ModelError(f"{where}: joint(s) {missing} not found (the MJCF has {len(joints)} joints: "
                         f"{sorted(joints)[:20]})")
    for j in spec.joints:
        if joints[j.name].type not in (mujoco.mjtJoint.mjJNT_HINGE, mujoco.mjtJoint.mjJNT_SLIDE):
            raise ModelError(f"{where}: joint '{j.name}' must be a hinge or slide joint")

    # one actuator per spec joint, converted to the spec's control law
    act_by_joint = {}
    for a in ms.actuators:
        if a.trntype == mujoco.mjtTrn.mjTRN_JOINT:
            act_by_joint.setdefault(a.target, a)
    no_act = [j.name for j in spec.joints if j.name not in act_by_joint]
    if no_act:
        raise ModelError(f"{where}: no actuator drives joint(s) {no_act}; add one <motor> or "
                         f"<position> actuator per joint")
    for j in spec.joints:
        a = act_by_joint[j.name]
        if spec.action.type in ("joint_position", "ee_delta"):
            # position servo with the spec's gains: force = kp (ctrl - q) - kd qdot
            a.gaintype = mujoco.mjtGain.mjGAIN_FIXED
            a.biastype = mujoco.mjtBias.mjBIAS_AFFINE
            a.dyntype = mujoco.mjtDyn.mjDYN_NONE
            gain = np.zeros(10)
            gain[0] = j.kp
            bias = np.zeros(10)
            bias[1], bias[2] = -j.kp, -j.kd
            a.gainprm = gain
            a.biasprm = bias
            a.gear = np.array([1.0, 0, 0, 0, 0, 0])
            a.ctrllimited = mujoco.mjtLimited.mjLIMITED_TRUE
            lo, hi = j.range
            a.ctrlrange = np.array([max(lo, -1e6), min(hi, 1e6)])
            if np.isfinite(j.torque_limit):  # gear is 1 here, so actuator force = joint torque
                a.forcelimited = mujoco.mjtLimited.mjLIMITED_TRUE
                a.forcerange = np.array([-j.torque_limit, j.torque_limit])

    if spec.action.gripper is not None and _find(ms.actuators, spec.action.gripper.actuator) is None:
        raise ModelError(f"{where}: gripper actuator '{spec.action.gripper.actuator}' not found")
    if spec.action.ee_site and _find(ms.sites, spec.action.ee_site) is None:
        raise ModelError(f"{where}: end-effector site '{spec.action.ee_site}' not found")

    requests = list(sensors)
    if joint_torque_sensors:
        for j in spec.joints:
            a = act_by_joint[j.name]
            if not a.name:
                a.name = f"s2r_act:{j.name}"
            requests.append(SensorRequest(f"jnt_torque:{j.name}", "actuatorfrc", a.name, objtype="actuator"))

    existing = {s.name for s in ms.sensors}
    site_names = {s.name for s in ms.sites}
    body_names = {b.name for b in ms.bodies}
    act_names = {a.name for a in ms.actuators}
    for r in requests:
        if r.type not in SENSOR_TYPES:
            raise ModelError(f"unknown sensor type '{r.type}' (known: {sorted(SENSOR_TYPES)})")
        pool = {"site": site_names, "body": body_names, "xbody": body_names, "actuator": act_names}[r.objtype]
        if r.objname not in pool:
            raise ModelError(f"{where}: the task needs {r.objtype} '{r.objname}' (for sensor "
                             f"'{r.name}'), which the model lacks")
        if r.name in existing:
            continue
        stype, _ = SENSOR_TYPES[r.type]
        ms.add_sensor(name=r.name, type=stype, objtype=OBJ_TYPES[r.objtype], objname=r.objname)
        existing.add(r.name)

    try:
        model = ms.compile()
    except Exception as e:
        raise ModelError(f"{where} failed to compile: {e}") from None

    jid = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, j.name) for j in spec.joints]
    act_ids = []
    for j in spec.joints:
        aid = next(i for i in range(model.nu) if model.actuator_trntype[i] == mujoco.mjtTrn.mjTRN_JOINT
                   and model.actuator_trnid[i, 0] == mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, j.name))
        act_ids.append(aid)
    idx = ModelIndex(
        joint_qpos=np.array([model.jnt_qposadr[i] for i in jid]),
        joint_dof=np.array([model.jnt_dofadr[i] for i in jid]),
        joint_act=np.array(act_ids),
    )
    for s in range(model.nsensor):
        name = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_SENSOR, s)
        if name:
            adr, dim = model.sensor_adr[s], model.sensor_dim[s]
            idx.sensors[name] = slice(int(adr), int(adr + dim))
    for i in range(model.njnt):
        if model.jnt_type[i] == mujoco.mjtJoint.mjJNT_FREE:
            name = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, i) or f"free{i}"
            idx.free_joints.append((name, int(model.jnt_qposadr[i]), int(model.jnt_dofadr[i])))
    if spec.base_body:
        bid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, spec.base_body)
        if bid < 0:
            raise ModelError(f"{where}: base body '{spec.base_body}' not found")
        for i in range(model.njnt):
            if model.jnt_bodyid[i] == bid and model.jnt_type[i] == mujoco.mjtJoint.mjJNT_FREE:
                idx.base_qpos, idx.base_dof = int(model.jnt_qposadr[i]), int(model.jnt_dofadr[i])
    if spec.action.gripper is not None:
        idx.gripper_act = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_ACTUATOR, spec.action.gripper.actuator)
    return model, idx


def check_spec_against_model(spec: RobotSpec, model: mujoco.MjModel) -> list[str]:
    """Spec joint ranges wider than the MJCF's limits (warnings for `s2r sim info`, not errors)."""
    out = []
    for j in spec.joints:
        jid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, j.name)
        if model.jnt_limited[jid]:
            lo, hi = model.jnt_range[jid]
            if j.range[0] < lo - 1e-6 or j.range[1] > hi + 1e-6:
                out.append(f"joint '{j.name}': spec range {j.range} exceeds MJCF range ({lo:.4f}, {hi:.4f})")
    return out

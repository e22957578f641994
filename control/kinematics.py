"""Forward kinematics of a serial chain of hinge/slide joints, numpy or torch, from an MJCF's constants.

The arm's end-effector actions need, every control step, the end-effector pose and each
joint's world anchor and axis (the IK Jacobian, control/ik.py). `SerialChain.from_model`
reads the constants of the chain from the world to one site out of a compiled MuJoCo model
(body offsets and orientations, joint anchors, axes and reference positions): on the robot
MuJoCo serves only as the MJCF parser, never as a simulator. `forward(q)` then repeats
MuJoCo's own kinematics (mj_kinematics: body frame = parent frame x body offset, each joint
rotates about its anchor by q - qpos0) for a batch `q: [N, nj]` in numpy (robot) or torch
(simulator, all envs in one call), so the pose that the policy sees and the IK uses is
the same function of the joint positions on both sides. tests/test_terms.py checks it
against mj_kinematics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from s2r.control.arrays import Array, asarray_like, namespace, zeros_like_shape
from s2r.control.rotations import quat_mul, quat_rotate

HINGE, SLIDE = 3, 2  # mjtJoint values


class KinematicsError(ValueError):
    pass


@dataclass
class ChainLink:
    """One body of the chain: its offset from the parent and the joints it carries."""

    pos: np.ndarray  # [3] in the parent frame
    quat: np.ndarray  # [4] (w, x, y, z) in the parent frame
    joints: list[tuple[int, int, np.ndarray, np.ndarray, float]]  # (spec index, type, anchor [3], axis [3], qpos0)


@dataclass
class SerialChain:
    links: list[ChainLink]  # from the first body below the world to the site's body
    site_pos: np.ndarray  # [3] in the last body's frame
    site_quat: np.ndarray  # [4]
    num_joints: int  # joints in q (spec joints)

    @classmethod
    def from_model(cls, model, joint_names: list[str], site: str) -> "SerialChain":
        """Constants of the world -> `site` chain of an MjModel; every joint on it must be a spec joint."""
        import mujoco  # the MJCF parser: the robot needs no simulator

        sid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, site)
        if sid < 0:
            raise KinematicsError(f"site '{site}' not found in the model")
        spec_index = {n: i for i, n in enumerate(joint_names)}
        bodies = []
        b = int(model.site_bodyid[sid])
        while b != 0:
            bodies.append(b)
            b = int(model.body_parentid[b])
        links, seen = [], set()
        for b in reversed(bodies):
            joints = []
            for j in range(model.body_jntadr[b], model.body_jntadr[b] + model.body_jntnum[b]):
                name = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, j)
                jtype = int(model.jnt_type[j])
                if name not in spec_index or jtype not in (HINGE, SLIDE):
                    raise KinematicsError(f"joint '{name}' on the chain to site '{site}' is not a hinge/slide "
                                          f"joint of the robot spec ({joint_names})")
                joints.append((spec_index[name], jtype, model.jnt_pos[j].copy(), model.jnt_axis[j].copy(),
                               float(model.qpos0[model.jnt_qposadr[j]])))
                seen.add(name)
            links.append(ChainLink(model.body_pos[b].copy(), model.body_quat[b].copy(), joints))
        off = [n for n in joint_names if n not in seen]
        if off:
            raise KinematicsError(f"spec joint(s) {off} are not on the chain from the world to site '{site}'")
        return cls(links, model.site_pos[sid].copy(), model.site_quat[sid].copy(), len(joint_names))

    @classmethod
    def from_spec(cls, spec) -> "SerialChain":
        """The chain to the spec's end-effector site, parsed from the spec's MJCF."""
        import mujoco

        if not spec.action.ee_site:
            raise KinematicsError(f"robot spec '{spec.name}' names no end-effector site (action.ee_site)")
        path = spec.resolve_mjcf()
        try:
            model = mujoco.MjModel.from_xml_path(str(path))
        except Exception as e:  # noqa: BLE001 - MuJoCo's parser message names the line
            raise KinematicsError(f"cannot parse MJCF {path}: {e}") from None
        return cls.from_model(model, spec.joint_names, spec.action.ee_site)

    def forward(self, q: Array) -> tuple[Array, Array, Array, Array]:
        """q [N, nj] -> (site pos [N, 3], site quat [N, 4], joint anchors [N, nj, 3], joint axes [N, nj, 3]),
        world frame; anchors/axes in spec joint order."""
        xp = namespace(q)
        n = q.shape[0]

        def const(a):  # [1, ...]: broadcasts against the batch
            return asarray_like(np.asarray(a)[None], q)

        pos = zeros_like_shape((n, 3), q)
        quat = zeros_like_shape((n, 4), q) + const([1.0, 0.0, 0.0, 0.0])
        anchors = [None] * self.num_joints
        axes = [None] * self.num_joints
        for link in self.links:
            pos = pos + quat_rotate(quat, const(link.pos))
            quat = quat_mul(quat, const(link.quat))
            for i, jtype, jpos, jaxis, q0 in link.joints:
                anchor = pos + quat_rotate(quat, const(jpos))
                axis = quat_rotate(quat, const(jaxis))
                anchors[i], axes[i] = anchor, axis
                angle = q[:, i] - q0
                if jtype == HINGE:
                    half = 0.5 * angle[:, None]
                    rot = xp.concatenate([xp.cos(half), xp.sin(half) * const(jaxis)], axis=-1)
                    quat = quat_mul(quat, rot)
                    pos = anchor - quat_rotate(quat, const(jpos))  # rotate about the anchor
                else:
                    pos = pos + axis * angle[:, None]
            quat = quat / xp.sqrt((quat * quat).sum(-1, keepdims=True))
        site_pos = pos + quat_rotate(quat, const(self.site_pos))
        site_quat = quat_mul(quat, const(self.site_quat))
        return site_pos, site_quat, xp.stack(anchors, axis=1), xp.stack(axes, axis=1)


def gripper_coupling(model, actuator: str) -> tuple[list[str], np.ndarray]:
    """(joint names, coefficients): the gripper opening is sum(coef * q) over those joints
    (a fixed tendon's wraps, or the one joint the actuator drives)."""
    import mujoco

    a = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_ACTUATOR, actuator)
    if a < 0:
        raise KinematicsError(f"gripper actuator '{actuator}' not found in the model")
    if model.actuator_trntype[a] == mujoco.mjtTrn.mjTRN_TENDON:
        t = int(model.actuator_trnid[a, 0])
        adr, num = int(model.tendon_adr[t]), int(model.tendon_num[t])
        jids = model.wrap_objid[adr:adr + num]
        names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, int(j)) for j in jids]
        return names, np.array(model.wrap_prm[adr:adr + num], dtype=np.float64)
    if model.actuator_trntype[a] == mujoco.mjtTrn.mjTRN_JOINT:
        j = int(model.actuator_trnid[a, 0])
        return [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, j)], np.ones(1)
    raise KinematicsError(f"gripper actuator '{actuator}' drives neither a joint nor a fixed tendon")

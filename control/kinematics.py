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

    def _constants(self, like: Array) -> list:
        """Per-link constants as arrays of like's namespace/dtype/device, converted once and cached."""
        key = (type(like).__module__, str(like.dtype), str(getattr(like, "device", "cpu")))
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            c = lambda a: asarray_like(np.asarray(a, dtype=np.float64), like)  # noqa: E731
            links = []
            for link in self.links:
                joints = []
                for i, jtype, jpos, jaxis, q0 in link.joints:
                    k = _skew(jaxis / np.linalg.norm(jaxis))
                    joints.append((i, jtype, c(jpos), c(jaxis), q0, c(k), c(k @ k)))
                links.append((c(link.pos), c(_quat_to_mat(link.quat)), joints))
            cache[key] = (links, c(self.site_pos), c(_quat_to_mat(self.site_quat)), c(np.eye(3)))
        return cache[key]

    def forward(self, q: Array) -> tuple[Array, Array, Array, Array]:
        """q [N, nj] -> (site pos [N, 3], site quat [N, 4], joint anchors [N, nj, 3], joint axes [N, nj, 3]),
        world frame; anchors/axes in spec joint order.

        Rotation matrices [N, 3, 3] along the chain (a few matmuls per link; quaternion algebra costs
        ~5x more small-array operations), each hinge by Rodrigues' formula with its constant skew matrix."""
        xp = namespace(q)
        links, site_pos, site_rot, eye = self._constants(q)
        n = q.shape[0]
        pos = zeros_like_shape((n, 3), q)
        rot = zeros_like_shape((n, 3, 3), q) + eye
        anchors = [None] * self.num_joints
        axes = [None] * self.num_joints
        for body_pos, body_rot, joints in links:
            pos = pos + rot @ body_pos  # [N, 3]
            rot = rot @ body_rot
            for i, jtype, jpos, jaxis, q0, k, k2 in joints:
                anchor = pos + rot @ jpos
                axis = rot @ jaxis
                anchors[i], axes[i] = anchor, axis
                angle = (q[:, i] - q0)[:, None, None]  # [N, 1, 1]
                if jtype == HINGE:
                    rot = rot @ (eye + xp.sin(angle) * k + (1.0 - xp.cos(angle)) * k2)
                    pos = anchor - rot @ jpos  # rotate about the anchor
                else:
                    pos = pos + axis * angle[:, :, 0]
        site = pos + rot @ site_pos
        return site, mat_to_quat(rot @ site_rot), xp.stack(anchors, axis=1), xp.stack(axes, axis=1)


def _skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def _quat_to_mat(q: np.ndarray) -> np.ndarray:
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def mat_to_quat(r: Array) -> Array:
    """Rotation matrices [N, 3, 3] -> unit quaternions [N, 4] (w, x, y, z), w >= 0.

    Shepperd's method without branches (one code path for numpy and torch): the four candidate
    quaternions, each computed from the largest of |w|, |x|, |y|, |z| as pivot, and per row the
    candidate whose pivot is largest (well conditioned also at 180 degrees, where w is 0)."""
    xp = namespace(r)
    r00, r01, r02 = r[:, 0, 0], r[:, 0, 1], r[:, 0, 2]
    r10, r11, r12 = r[:, 1, 0], r[:, 1, 1], r[:, 1, 2]
    r20, r21, r22 = r[:, 2, 0], r[:, 2, 1], r[:, 2, 2]
    # 4 |pivot| estimates: 4w^2, 4x^2, 4y^2, 4z^2
    m = xp.stack([1.0 + r00 + r11 + r22, 1.0 + r00 - r11 - r22, 1.0 - r00 + r11 - r22, 1.0 - r00 - r11 + r22], axis=-1)
    p = 2.0 * xp.sqrt(xp.clip(m, 1e-12, None))  # [N, 4]: 4w, 4x, 4y, 4z (of each pivot's candidate)
    cand = xp.stack([
        xp.stack([p[:, 0] * 0.25, (r21 - r12) / p[:, 0], (r02 - r20) / p[:, 0], (r10 - r01) / p[:, 0]], axis=-1),
        xp.stack([(r21 - r12) / p[:, 1], p[:, 1] * 0.25, (r01 + r10) / p[:, 1], (r02 + r20) / p[:, 1]], axis=-1),
        xp.stack([(r02 - r20) / p[:, 2], (r01 + r10) / p[:, 2], p[:, 2] * 0.25, (r12 + r21) / p[:, 2]], axis=-1),
        xp.stack([(r10 - r01) / p[:, 3], (r02 + r20) / p[:, 3], (r12 + r21) / p[:, 3], p[:, 3] * 0.25], axis=-1),
    ], axis=1)  # [N, 4 candidates, 4]
    best = m.argmax(-1)  # [N]
    quat = cand[xp.arange(r.shape[0]), best]  # [N, 4]
    return xp.where(quat[:, :1] < 0, -quat, quat)


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

"""Offscreen rendering of one env of a batch to RGB frames / MP4.

Headless: MuJoCo's EGL backend (MUJOCO_GL=egl, Debian's libegl1 + Mesa) works on
a CPU-only machine; OSMesa is a fallback. `RenderUnavailable` says clearly why a
video cannot be made instead of failing deep inside OpenGL.
"""

from __future__ import annotations

import os

import numpy as np


class RenderUnavailable(RuntimeError):
    pass


def _ensure_gl_backend() -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] == "egl":
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


class EnvRenderer:
    def __init__(self, env, width: int = 640, height: int = 480, camera: str | None = "track"):
        _ensure_gl_backend()
        import mujoco

        self.env = env
        self.mujoco = mujoco
        m = env.model
        width = min(width, m.vis.global_.offwidth)
        height = min(height, m.vis.global_.offheight)
        try:
            self.renderer = mujoco.Renderer(m, height=height, width=width)
        except Exception as e:  # no GL context: name the fix
            raise RenderUnavailable(
                f"offscreen rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {e}. "
                "On Debian/Ubuntu install libegl1 libegl-mesa0 libgl1-mesa-dri (make bootstrap does "
                "this when run as root), or set MUJOCO_GL=osmesa with libosmesa6.") from None
        self.data = mujoco.MjData(m)
        cam = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_CAMERA, camera) if camera else -1
        self.camera = cam if cam >= 0 else -1
        self.target_mocap = None
        bid = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "target")
        if bid >= 0 and m.body_mocapid[bid] >= 0:
            self.target_mocap = int(m.body_mocapid[bid])

    def frame(self, env_id: int = 0) -> np.ndarray:
        """[H, W, 3] uint8 image of env_id's current state."""
        mj, m, d = self.mujoco, self.env.model, self.data
        be = self.env.backend
        d.qpos[:] = be.qpos[env_id].detach().cpu().numpy()
        d.qvel[:] = be.qvel[env_id].detach().cpu().numpy()
        if self.target_mocap is not None and hasattr(self.env.task, "target"):
            d.mocap_pos[self.target_mocap] = self.env.task.target[env_id].detach().cpu().numpy()
        mj.mj_forward(m, d)
        self.renderer.update_scene(d, camera=self.camera)
        return self.renderer.render().copy()

    def close(self) -> None:
        self.renderer.close()


def write_video(path: str, frames: list[np.ndarray], fps: float) -> None:
    """Write frames to MP4 (imageio-ffmpeg), via a temp file renamed into place."""
    import imageio.v2 as imageio

    tmp = f"{path}.part.mp4"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=7, macro_block_size=8) as w:
        for f in frames:
            w.append_data(f)
    os.replace(tmp, path)

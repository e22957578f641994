"""Array namespaces: the control code runs on numpy (robot) and on torch (batched simulation).

Every function in control/ takes arrays with a leading batch dimension `[N, ...]` and
looks up its namespace from its inputs: numpy arrays use numpy, torch tensors use torch.
torch mirrors numpy's names for what control/ needs (stack, concatenate, clip, where,
sqrt, arctan2, linalg.solve, swapaxes, roll), so one body of code serves both, and the
robot, which never has torch, never imports it: `namespace` only looks torch up in
sys.modules, where it is present only if the caller already imported it.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

Array = Any  # np.ndarray | torch.Tensor, [N, ...]


def namespace(*arrays: Array) -> ModuleType:
    """numpy, or torch when any argument is a torch tensor."""
    torch = sys.modules.get("torch")
    if torch is not None:
        for a in arrays:
            if isinstance(a, torch.Tensor):
                return torch
    return np


def asarray_like(x: Any, like: Array) -> Array:
    """x (a number, list or array) as an array of like's namespace, dtype and device."""
    xp = namespace(like)
    if xp is np:
        return np.asarray(x, dtype=like.dtype)
    return xp.as_tensor(x, dtype=like.dtype, device=like.device)


_CONSTANTS: dict = {}  # (values, dtype, device) -> torch tensor, see constant_like


def constant_like(values: tuple, like: Array, dtype: Any = None) -> Array:
    """A small constant (a tuple of numbers) as an array of like's namespace and device, in dtype (default:
    like's). torch: built once per (values, dtype, device) and shared, since building a tensor costs about
    as much as the op that uses it; read it, never modify it in place."""
    xp = namespace(like)
    dtype = like.dtype if dtype is None else dtype
    if xp is np:
        return np.asarray(values, dtype=dtype)
    key = (values, dtype, like.device)
    c = _CONSTANTS.get(key)
    if c is None:
        with xp.inference_mode(False):  # a normal tensor even when first built under inference mode
            c = _CONSTANTS[key] = xp.as_tensor(values, dtype=dtype, device=like.device)
    return c


def eye_like(m: int, like: Array) -> Array:
    xp = namespace(like)
    if xp is np:
        return np.eye(m, dtype=like.dtype)
    return xp.eye(m, dtype=like.dtype, device=like.device)


def zeros_like_shape(shape: tuple[int, ...], like: Array) -> Array:
    xp = namespace(like)
    if xp is np:
        return np.zeros(shape, dtype=like.dtype)
    return xp.zeros(shape, dtype=like.dtype, device=like.device)


def cross(a: Array, b: Array) -> Array:
    """a x b over the last axis (size 3). torch: one kernel (a sixth of the written-out version's time
    on the simulator's small batches; float32 results may differ from it in the last bit); numpy:
    written out (np.cross's Python overhead is most of a robot-side call)."""
    xp = namespace(a, b)
    if xp is not np:
        return xp.linalg.cross(a, b, dim=-1)
    ax, ay, az = a[..., 0], a[..., 1], a[..., 2]
    bx, by, bz = b[..., 0], b[..., 1], b[..., 2]
    return xp.stack([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx], axis=-1)


def stack_last(cols: list) -> Array:
    """Stack [N] arrays into [N, k] (np.stack's Python overhead is most of a small robot-side term)."""
    xp = namespace(cols[0])
    if xp is not np:
        return xp.stack(cols, axis=-1)
    out = np.empty(np.shape(cols[0]) + (len(cols),), dtype=np.result_type(*cols))
    for i, c in enumerate(cols):
        out[..., i] = c
    return out


def clip(a: Array, lo, hi) -> Array:
    """min(max(a, lo), hi); numpy's ufuncs directly (np.clip costs ~5 us of Python per call)."""
    xp = namespace(a)
    if xp is np:
        return np.minimum(np.maximum(a, lo), hi)
    return xp.clip(a, lo, hi)

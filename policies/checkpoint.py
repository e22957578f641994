"""Training checkpoints: verified, atomic, pickle-free files in <run_dir>/checkpoints/ckpt_<step>.pt.

The trainer saves a payload (nested dicts/lists of tensors, numbers and strings) every few
env steps and resumes from `latest_checkpoint`; export and evaluation load the same files.
The payload carries the robot spec the run trained with (`SPEC_KEY`: JSON of RobotSpec.to_dict(),
next to its `spec_hash`), so export needs nothing but the checkpoint.

File layout (all little-endian):
    magic b"S2R-CKPT" | format version u32 | payload length u64 | sha256(payload) 32 B | payload
where payload is torch.save(payload_dict). The header catches truncation and bit rot before
unpickling; loading uses torch.load(weights_only=True) only, so a file cannot run code.
Writes go through s2r.io.atomic_write_bytes: after kill -9 the directory holds whole files.

Also here: the process RNG state (torch CPU/CUDA, numpy's global RNG, python `random`) in a
weights_only-loadable form, so a resumed run draws the same numbers. Generators owned by the
caller (torch.Generator, np.random.Generator) are saved by the caller.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import struct
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2r.control.spec import RobotSpec, SpecError, check_spec_hash
from s2r.io import atomic_write_bytes

MAGIC = b"S2R-CKPT"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")  # magic, version, payload length, sha256 -> 52 bytes
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
# exactly what torch.load(weights_only=True) reads back (exact types: np.float64 subclasses float)
_LEAVES = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_SEQUENCES = (list, tuple)
_MAPPINGS = (dict, OrderedDict)  # nn.Module.state_dict() is an OrderedDict
# payload keys of the robot contract: the spec's hash ("" for a gymnasium task), the spec itself
# (JSON of RobotSpec.to_dict(); None for a gymnasium task; absent in checkpoints saved before s2r
# embedded it) and the file it was loaded from (a note, not part of the contract)
SPEC_HASH_KEY, SPEC_KEY, SPEC_SOURCE_KEY = "spec_hash", "spec", "spec_source"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, not ours, or made for another robot spec; the message says which."""


# ---- writing and reading ----------------------------------------------------------------


def _check_payload(x: Any, where: str = "payload") -> None:
    """Allow only what torch.load(weights_only=True) reads back: tensors, numbers, strings, lists, dicts."""
    if isinstance(x, torch.Tensor) or type(x) in _LEAVES:
        return
    if type(x) in _SEQUENCES:
        for i, v in enumerate(x):
            _check_payload(v, f"{where}[{i}]")
        return
    if type(x) in _MAPPINGS:
        for k, v in x.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has a {type(k).__name__} key {k!r}; checkpoint dict keys are str or int")
            _check_payload(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(x).__module__}.{type(x).__qualname__}; checkpoints hold only tensors, "
                    f"numbers, strings, None, lists and dicts (convert with torch.as_tensor, float() or int())")


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Serialise `payload` behind a verified header and write it atomically."""
    _check_payload(payload)
    buf = io.BytesIO()
    buf.write(bytes(_HEADER.size))  # placeholder, filled in below: saves copying a large payload
    torch.save(payload, buf)
    view = buf.getbuffer()
    body = view[_HEADER.size :]
    _HEADER.pack_into(view, 0, MAGIC, FORMAT_VERSION, len(body), hashlib.sha256(body).digest())
    del body
    atomic_write_bytes(path, view)  # type: ignore[arg-type]  # any bytes-like object works


def _parse_header(path: Path, head: bytes, file_size: int) -> tuple[int, bytes]:
    """-> (payload length, sha256); raises CheckpointError naming the file and the defect."""
    if file_size == 0:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: the file is empty")
    if not MAGIC.startswith(head[: len(MAGIC)]):  # a short head only has to match MAGIC's prefix
        raise CheckpointError(f"{path} is not an s2r checkpoint (no {MAGIC.decode()} header; "
                              f"s2r checkpoints are written by s2r.policies.checkpoint.save_checkpoint)")
    if len(head) < _HEADER.size:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {file_size} bytes is shorter "
                              f"than the {_HEADER.size}-byte header")
    _, version, length, digest = _HEADER.unpack(head)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this s2r reads up to "
                              f"{FORMAT_VERSION}: upgrade s2r")
    if file_size != _HEADER.size + length:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: the header promises {length} payload "
                              f"bytes but the file holds {file_size - _HEADER.size}")
    return length, digest


def _open_verified(path: str | os.PathLike) -> bytes:
    """The payload bytes of a checkpoint whose header and checksum are intact."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    _, digest = _parse_header(path, data[: _HEADER.size], len(data))
    body = memoryview(data)[_HEADER.size :]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: checksum mismatch "
                              f"(the payload's sha256 differs from the one recorded when it was saved)")
    return data[_HEADER.size :]


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless `path` is a whole, uncorrupted checkpoint. Streams: O(1) memory."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _, digest = _parse_header(path, f.read(_HEADER.size), size)
            h = hashlib.sha256()
            while chunk := f.read(1 << 24):
                h.update(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    if h.digest() != digest:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: checksum mismatch")


def load_checkpoint(path: str | os.PathLike, expected_spec_hash: str | None = None,
                    map_location: str | torch.device = "cpu", expected_spec: RobotSpec | None = None) -> dict:
    """Verify, then torch.load(weights_only=True); refuse a checkpoint made for another robot spec.

    expected_spec (or just its hash, expected_spec_hash): the spec in use; with the spec, the
    message names the first difference from the one the checkpoint embeds."""
    body = _open_verified(path)
    try:
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as e:  # checksum was fine, so the writer stored something weights_only refuses
        raise CheckpointError(f"checkpoint {path} could not be loaded as plain tensors/numbers/strings: {e}") from e
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not an s2r checkpoint: its payload is a {type(payload).__name__}, not a dict")
    in_use = expected_spec if expected_spec is not None else expected_spec_hash
    if in_use is not None:
        trained = embedded_spec(payload, path) if payload.get(SPEC_KEY) is not None else None
        try:
            check_spec_hash(payload.get(SPEC_HASH_KEY), in_use, f"checkpoint {path}",
                            expected_spec=trained.to_dict() if trained is not None else None)
        except SpecError as e:
            raise CheckpointError(str(e)) from None
    return payload


def embedded_spec(payload: dict, path: str | os.PathLike) -> RobotSpec | None:
    """The robot spec a checkpoint's run trained with (None: a task without one, e.g. a gymnasium id).

    Raises CheckpointError if the checkpoint predates embedded specs (no SPEC_KEY; check
    `SPEC_KEY in payload` first to fall back), or if the embedded spec is unreadable or does not
    hash to the recorded spec_hash."""
    if SPEC_KEY not in payload:
        raise CheckpointError(f"checkpoint {path} was saved by an older s2r without the robot spec inside; "
                              f"continue the run (s2r train --resume) to save checkpoints that carry it")
    if payload[SPEC_KEY] is None:
        return None
    try:
        spec = RobotSpec.from_dict(json.loads(payload[SPEC_KEY]), source=payload.get(SPEC_SOURCE_KEY) or None)
    except (TypeError, json.JSONDecodeError, SpecError) as e:
        raise CheckpointError(f"checkpoint {path}: its embedded robot spec is unreadable: {e}") from None
    if spec.hash() != payload.get(SPEC_HASH_KEY):
        raise CheckpointError(f"checkpoint {path}: its embedded robot spec hashes to {spec.hash()}, but the "
                              f"checkpoint records spec_hash {payload.get(SPEC_HASH_KEY)!r}; the file was edited")
    return spec


# ---- a run's checkpoint folder ----------------------------------------------------------


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt_{step:09d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every ckpt_<step>.pt in run_dir/checkpoints, oldest first (unverified)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint at step {step}: {e}", stacklevel=2)
            continue
        return path
    return None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int = 3) -> list[Path]:
    """Delete all but the `keep` newest checkpoints, and temp files left by interrupted saves.

    Call it from the process that writes checkpoints (a temp file may be a save in progress).
    Returns the deleted paths.
    """
    if keep < 1:
        raise ValueError(f"prune_checkpoints keep must be >= 1 (got {keep}); keeping none would lose the run")
    doomed = [p for _, p in list_checkpoints(run_dir)[:-keep]]
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():  # atomic_write_bytes temp files: .ckpt_<step>.pt.<random>.tmp
        doomed += [p for p in folder.glob(".ckpt_*.tmp")]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# ---- RNG state ----------------------------------------------------------------------------


def rng_state() -> dict:
    """torch CPU (+ CUDA if initialised), numpy global and python `random` states, weights_only-safe."""
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # don't create a CUDA context just to save
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() saved (tensors may come back on any device via map_location)."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))

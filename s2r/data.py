"""`s2r data inspect|export`: recorded sessions (control/recording.py MCAP files) summarised for a
person, and exported as a LeRobot-style Parquet dataset for learners outside s2r.

    s2r data inspect recordings/                      # every *.mcap in the folder
    s2r data export recordings/*.mcap --out datasets/g1_corrections

Export layout (docs/RECORDING.md):
    DIR/data/chunk-000/episode_000000.parquet   one file per episode, 1000 episodes per chunk folder
    DIR/meta/info.json                          fps, features (dtype, shape, names), robot spec + hash, totals
    DIR/meta/episodes.jsonl                     one line per episode: length, success label, source file
    DIR/meta/tasks.jsonl                        the one task (the robot spec's name)
Columns: observation.state list<float32> [obs_dim], action list<float32> [action_dim] (executed),
policy_action list<float32>, intervened bool, next.reward float32 (NaN: none recorded),
next.done bool, episode_index, frame_index, index, task_index int64, timestamp float32 (s from the
episode's first tick); observation.privileged list<float32> when the recordings have it.
The dataset is written into a temporary folder next to DIR and renamed into place whole.
Imports numpy and the recording module; pyarrow only for export (the `train` extra).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from s2r.control.recording import Recording, RecordingError, read_recording, recording_files
from s2r.control.spec import SpecError
from s2r.io import atomic_write_bytes, atomic_write_text

CHUNK_EPISODES = 1000  # LeRobot's chunks_size: episodes per data/chunk-NNN folder


class DataError(ValueError):
    """Bad input to `s2r data`: one line, for the CLI's `error:`."""


def load_recordings(paths: Sequence[str | os.PathLike], same_spec: bool) -> list[Recording]:
    """Read every file named (folders: their *.mcap); with same_spec, refuse recordings of two robot specs."""
    files = recording_files(paths)
    if not files:
        raise DataError("no recordings given (folders named hold no *.mcap files)")
    recs = []
    for f in files:
        try:
            recs.append(read_recording(f))
        except (RecordingError, SpecError) as e:
            raise DataError(str(e)) from None
    if same_spec:
        for r in recs[1:]:
            if r.spec_hash != recs[0].spec_hash:
                raise DataError(f"recordings of different robot specs cannot go in one dataset: {recs[0].path} is "
                                f"{_robot(recs[0])}, {r.path} is {_robot(r)}")
    return recs


def _robot(r: Recording) -> str:
    return f"'{r.metadata.get('robot', '?')}' (spec hash {r.spec_hash})"


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def _rate(x: np.ndarray) -> float | None:
    return round(float(x.mean()), 4) if x.size else None


def summarize(rec: Recording) -> dict[str, Any]:
    """What a session holds: episodes, steps, duration, intervention rate (overall, per episode, per
    minute of the session), success labels, who was in control, the spec, policy and operator."""
    dt = rec.control_dt
    t0 = float(rec.t[0]) if len(rec) else 0.0
    episodes = []
    for ep in rec.episodes:
        rows = slice(ep.start, ep.start + ep.steps)
        episodes.append({"episode": ep.index, "steps": ep.steps,
                         "duration_s": round(float(rec.t[rows][-1] - rec.t[rows][0]) + dt, 3),
                         "intervention_rate": _rate(rec.intervened[rows]), "success": ep.success,
                         "reason": ep.reason, "ended": ep.ended})
    minutes = ((rec.t - t0) // 60).astype(np.int64)
    per_minute = [{"minute": int(m), "steps": int((minutes == m).sum()),
                   "intervention_rate": _rate(rec.intervened[minutes == m])} for m in np.unique(minutes)]
    labelled = [ep.success for ep in rec.episodes if ep.success is not None]
    return {
        "file": rec.path, "robot": rec.metadata.get("robot"), "spec_hash": rec.spec_hash,
        "policy_id": rec.policy_id, "operator_id": rec.operator_id,
        "started_utc": rec.metadata.get("started_utc"), "s2r_version": rec.metadata.get("s2r_version"),
        "control_hz": round(1.0 / dt, 3), "episodes": len(rec.episodes), "steps": len(rec),
        "duration_s": round(float(rec.t[-1] - t0) + dt, 3) if len(rec) else 0.0,
        "intervention_rate": _rate(rec.intervened), "intervened_steps": int(rec.intervened.sum()),
        "labelled_episodes": len(labelled), "successes": sum(labelled),
        "success_rate": round(sum(labelled) / len(labelled), 4) if labelled else None,
        "sources": dict(Counter(rec.source.tolist()).most_common()),
        "modes": dict(Counter(rec.mode.tolist()).most_common()),
        "safety_steps": int((rec.safety_interventions != 0).sum()),
        "complete": rec.complete, "dropped_bytes": rec.dropped_bytes, "warning": rec.warning,
        "per_episode": episodes, "per_minute": per_minute,
    }


def inspect_recordings(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """{"files": [summarize(...) per file], "total": {...}}; recordings of several specs are allowed."""
    sums = [summarize(r) for r in load_recordings(paths, same_spec=False)]
    steps = sum(s["steps"] for s in sums)
    labelled = sum(s["labelled_episodes"] for s in sums)
    successes = sum(s["successes"] for s in sums)
    total = {"files": len(sums), "robots": sorted({f"{s['robot']} {s['spec_hash']}" for s in sums}),
             "episodes": sum(s["episodes"] for s in sums), "steps": steps,
             "duration_s": round(sum(s["duration_s"] for s in sums), 3),
             "intervention_rate": round(sum(s["intervened_steps"] for s in sums) / steps, 4) if steps else None,
             "labelled_episodes": labelled, "successes": successes,
             "success_rate": round(successes / labelled, 4) if labelled else None,
             "incomplete_files": sum(not s["complete"] for s in sums)}
    return {"files": sums, "total": total}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_inspect(report: dict[str, Any]) -> str:
    """The report as a table per file and a total line (the CLI prints the JSON after it)."""
    lines = []
    for s in report["files"]:
        lines.append(f"{s['file']}")
        lines.append(f"  robot {s['robot']} (spec {s['spec_hash']}), policy {s['policy_id']!r}, operator "
                     f"{s['operator_id']!r}, started {s['started_utc']}, s2r {s['s2r_version']}")
        success = (f"{s['successes']}/{s['labelled_episodes']} labelled ({_pct(s['success_rate'])})"
                   if s["labelled_episodes"] else "no labels")
        lines.append(f"  {s['episodes']} episodes, {s['steps']} steps, {s['duration_s']:.1f} s at "
                     f"{s['control_hz']:g} Hz; interventions {_pct(s['intervention_rate'])} of steps; "
                     f"success {success}")
        lines.append("  sources " + (", ".join(f"{k} {v}" for k, v in s["sources"].items()) or "-")
                     + "; modes " + (", ".join(f"{k or '-'} {v}" for k, v in s["modes"].items()) or "-")
                     + f"; safety filter intervened on {s['safety_steps']} steps")
        if s["per_episode"]:
            lines.append(f"  {'episode':>7} {'steps':>6} {'duration_s':>10} {'intervened':>10} {'success':>7}  reason")
            for e in s["per_episode"]:
                label = {True: "yes", False: "no", None: "-"}[e["success"]] if e["ended"] else "(open)"
                lines.append(f"  {e['episode']:>7} {e['steps']:>6} {e['duration_s']:>10.2f} "
                             f"{_pct(e['intervention_rate']):>10} {label:>7}  {e['reason']}")
        if len(s["per_minute"]) > 1:
            lines.append("  interventions per minute: " + ", ".join(
                f"{m['minute']}: {_pct(m['intervention_rate'])}" for m in s["per_minute"]))
        if s["warning"]:
            lines.append(f"  warning: {s['warning']}")
    t = report["total"]
    lines.append(f"total: {t['files']} file(s), {t['episodes']} episodes, {t['steps']} steps, "
                 f"{t['duration_s']:.1f} s, interventions {_pct(t['intervention_rate'])}, success "
                 f"{t['successes']}/{t['labelled_episodes']} ({_pct(t['success_rate'])})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def export_lerobot(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Write the recordings as a LeRobot-style dataset at `out` (layout in the module docstring).
    Refuses a non-empty `out`, recordings of different robot specs, and files that do not read."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("s2r data export needs pyarrow: pip install 's2r[train]' (or pip install pyarrow)") from None
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} already exists and is not an empty folder; choose a new one")
    recs = load_recordings(paths, same_spec=True)
    if not any(len(r) for r in recs):
        raise DataError("the recordings hold no ticks: nothing to export")
    spec = recs[0].spec
    fps = 1.0 / spec.control_dt
    has_priv = all(r.privileged_obs is not None for r in recs)
    priv_dim = recs[0].privileged_obs.shape[1] if has_priv else 0
    if has_priv and any(r.privileged_obs.shape[1] != priv_dim for r in recs):
        has_priv = False  # sizes differ between sessions: leave the column out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        episodes_meta, index = [], 0
        for r in recs:
            for ep in r.episodes:
                e = len(episodes_meta)
                rows = slice(ep.start, ep.start + ep.steps)
                n = ep.steps
                done = np.zeros(n, bool)
                done[-1] = ep.ended
                cols = {
                    "observation.state": _list_column(pa, r.obs[rows]),
                    "action": _list_column(pa, r.executed_action[rows]),
                    "policy_action": _list_column(pa, r.policy_action[rows]),
                    "intervened": pa.array(r.intervened[rows]),
                    "next.reward": pa.array(r.reward[rows], type=pa.float32()),
                    "next.done": pa.array(done),
                    "episode_index": pa.array(np.full(n, e, np.int64)),
                    "frame_index": pa.array(np.arange(n, dtype=np.int64)),
                    "timestamp": pa.array((r.t[rows] - r.t[ep.start]).astype(np.float32)),
                    "index": pa.array(np.arange(index, index + n, dtype=np.int64)),
                    "task_index": pa.array(np.zeros(n, np.int64)),
                }
                if has_priv:
                    cols["observation.privileged"] = _list_column(pa, r.privileged_obs[rows])
                buf = pa.BufferOutputStream()
                pq.write_table(pa.table(cols), buf)
                atomic_write_bytes(tmp / "data" / f"chunk-{e // CHUNK_EPISODES:03d}" / f"episode_{e:06d}.parquet",
                                   buf.getvalue().to_pybytes())
                index += n
                episodes_meta.append({"episode_index": e, "tasks": [spec.name], "length": n,
                                      "success": ep.success, "ended": ep.ended, "reason": ep.reason,
                                      "intervention_rate": _rate(r.intervened[rows]),
                                      "source_file": os.path.basename(r.path), "source_episode": ep.index,
                                      "policy_id": r.policy_id, "operator_id": r.operator_id})
        names = (spec.joint_names if spec.action.type != "ee_delta"
                 else ["ee_dx", "ee_dy", "ee_dz"] + (["gripper"] if spec.action.gripper is not None else []))
        features = {
            "observation.state": {"dtype": "float32", "shape": [spec.observation.dim], "names": None},
            "action": {"dtype": "float32", "shape": [spec.action_dim], "names": names},
            "policy_action": {"dtype": "float32", "shape": [spec.action_dim], "names": names},
            "intervened": {"dtype": "bool", "shape": [1], "names": None},
            "next.reward": {"dtype": "float32", "shape": [1], "names": None},
            "next.done": {"dtype": "bool", "shape": [1], "names": None},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        }
        if has_priv:
            features["observation.privileged"] = {"dtype": "float32", "shape": [priv_dim], "names": None}
        n_ep = len(episodes_meta)
        info = {
            "codebase_version": "v2.1", "robot_type": spec.name, "total_episodes": n_ep, "total_frames": index,
            "total_tasks": 1, "total_videos": 0, "total_chunks": math.ceil(n_ep / CHUNK_EPISODES),
            "chunks_size": CHUNK_EPISODES, "fps": round(fps, 6), "splits": {"train": f"0:{n_ep}"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": None, "features": features,
            "s2r": {"spec_hash": recs[0].spec_hash, "spec": spec.to_dict(), "action_type": spec.action.type,
                    "source_files": [os.path.basename(r.path) for r in recs],
                    "policy_ids": sorted({r.policy_id for r in recs}),
                    "operator_ids": sorted({r.operator_id for r in recs}),
                    "incomplete_files": [os.path.basename(r.path) for r in recs if not r.complete]},
        }
        atomic_write_text(tmp / "meta" / "info.json", json.dumps(info, indent=2) + "\n")
        atomic_write_text(tmp / "meta" / "episodes.jsonl", "".join(json.dumps(m) + "\n" for m in episodes_meta))
        atomic_write_text(tmp / "meta" / "tasks.jsonl", json.dumps({"task_index": 0, "task": spec.name}) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "episodes": n_ep, "frames": index, "fps": info["fps"], "robot": spec.name,
            "spec_hash": recs[0].spec_hash, "files": len(recs),
            "warnings": [r.warning for r in recs if r.warning]}


def _list_column(pa: Any, x: np.ndarray) -> Any:
    """[n, d] float32 -> a list<float32> column without a Python loop."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    offsets = np.arange(0, x.size + 1, x.shape[1], dtype=np.int32) if x.shape[1] else np.zeros(x.shape[0] + 1, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(x.reshape(-1), type=pa.float32()))

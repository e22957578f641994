"""Offline finetuning from recorded robot sessions: `s2r finetune` and `s2r data classifier`.

Where the data comes from: MCAP recordings of the policy node (control/recording.py), in which an
operator corrected the policy (intervened ticks carry the operator's, i.e. the executed, action) and
labelled episodes success / failure; optionally pure teleoperated demonstrations recorded the same
way. Where it goes: a new run directory (RLPDLearner.save: config.yaml + checkpoints/, read by
`s2r export`, `s2r eval` and a later finetune) and, with an ONNX path, the verified export the node
loads with `policy_path`.

    recordings --read_recording(expected_spec = the run's spec)--> transitions()
      --reward (recorded | labels | classifier)--> drop rows with NaN / Inf (counted)
      --> RLPDLearner.add (online; intervened rows also to the demo buffer), add_demos (--demos files)
      --> `updates` RLPD updates (half demo / half online batches by default) --> save (+ export)

Reward choices:
  recorded    the reward stored in each tick (sim sessions); ticks without one are dropped and counted
  labels      transitions(reward_from_success=True): 1.0 on the last tick of a success-labelled
              episode, 0.0 elsewhere
  classifier  a learned success classifier (policies/success.py) on the transition's next observation
              (the state the action led to; the last tick of an episode has no next observation
              recorded, so there its own), 1.0 where p >= its threshold
`done` is the recording's: the episode ended after the tick (a label or the session's end of it).
The robot and the learner live in separate processes in HIL-SERL; offline, all the data is present
before the first update, so the learner's `learning_starts` is 1 here.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from s2r.control.recording import Recording, RecordingError, read_recording, recording_files, transitions
from s2r.control.spec import RobotSpec, SpecError

REWARDS = ("recorded", "labels", "classifier")
CLASSIFIER_FILE = "success_classifier.pt"  # where a classifier trained by finetune is saved in its run dir


class FinetuneError(ValueError):
    """Bad input to `s2r finetune` / `s2r data classifier`: one line, for the CLI's `error:`."""


def read_recordings(paths: Sequence[str | os.PathLike], spec: RobotSpec | None, what: str) -> list[Recording]:
    """Every file named (folders: their *.mcap), each checked against `spec` (None: against the first
    file's). A missing, corrupt or foreign file, or one for another robot spec, is a FinetuneError."""
    files = recording_files(paths)
    if not files:
        raise FinetuneError(f"no {what} given (the folders named hold no *.mcap files)")
    recs: list[Recording] = []
    for f in files:
        try:
            recs.append(read_recording(f, expected_spec=spec if spec is not None else
                                       (recs[0].spec if recs else None)))
        except (RecordingError, SpecError) as e:
            raise FinetuneError(str(e)) from None
    return recs


def _finite_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    """[N] bool: obs, next_obs, action and reward all finite."""
    ok = np.isfinite(batch["reward"])
    for k in ("obs", "next_obs", "action"):
        ok &= np.isfinite(batch[k]).all(axis=1)
    return ok


def rewarded_transitions(recs: Sequence[Recording], reward: str, classifier=None) -> tuple[dict, dict]:
    """transitions() of recs with the chosen reward, rows that cannot be learnt from removed.
    -> (batch, counts): counts has transitions (before dropping), no_reward (recorded reward missing),
    nonfinite (NaN / Inf in obs, next obs or action), kept."""
    batch = transitions(list(recs), reward_from_success=reward == "labels")
    n = len(batch["obs"])
    no_reward = 0
    if reward == "recorded":
        missing = ~np.isfinite(batch["reward"])
        no_reward = int(missing.sum())
        keep = ~missing
    elif reward == "classifier":
        keep = np.ones(n, bool)
        ok_next = np.isfinite(batch["next_obs"]).all(axis=1)
        r = np.zeros(n, np.float32)
        if ok_next.any():
            r[ok_next] = classifier.rewards(batch["next_obs"][ok_next])
        batch["reward"] = r
    else:
        keep = np.ones(n, bool)
    nonfinite_rows = ~_finite_rows(batch) & keep
    keep &= ~nonfinite_rows
    batch = {k: v[keep] for k, v in batch.items()}
    return batch, {"transitions": n, "no_reward": no_reward, "nonfinite": int(nonfinite_rows.sum()),
                   "kept": int(keep.sum())}


def train_classifier(paths: Sequence[str | os.PathLike], out: str | os.PathLike, cfg=None,
                     spec: RobotSpec | None = None) -> tuple[object, dict]:
    """`s2r data classifier`: train a success classifier on the labelled episodes of the recordings
    (one robot spec), save it to `out`; -> (classifier, report)."""
    from s2r.policies.success import ClassifierError, SuccessClassifier

    out = Path(out)
    if out.is_dir():
        raise FinetuneError(f"--out {out} is a directory; give a file name such as {out / 'success.pt'}")
    recs = read_recordings(paths, spec, "recordings")
    try:
        clf = SuccessClassifier.train(recs, cfg)
    except (ClassifierError, SpecError) as e:
        raise FinetuneError(str(e)) from None
    clf.save(out)
    return clf, {"classifier": str(out), "files": len(recs), **clf.metrics}


def finetune(run: str | os.PathLike, data: Sequence[str | os.PathLike], out: str | os.PathLike, hil_cfg=None,
             demos: Sequence[str | os.PathLike] = (), reward: str = "labels", classifier: str | os.PathLike | None = None,
             train_classifier_cfg=None, updates: int | None = None, export: str | os.PathLike | None = None,
             device: str = "cpu", progress: Callable[[int, int], None] | None = None,
             note: Callable[[str], None] | None = None) -> dict:
    """Finetune the run `run` on recordings; see the module docstring. Returns the report the CLI
    prints. train_classifier_cfg: a ClassifierConfig to train a success classifier on the labelled
    episodes of data + demos (with reward "classifier" and no `classifier` file).
    progress(done, total) is called after each update; note(text) for things the user should know."""
    from s2r.policies.checkpoint import CheckpointError
    from s2r.policies.hil import HILConfig, RLPDLearner

    note = note or (lambda _msg: None)
    t0 = time.perf_counter()
    if reward not in REWARDS:
        raise FinetuneError(f"unknown --reward '{reward}' ({' | '.join(REWARDS)})")
    if reward == "classifier" and (classifier is None) == (train_classifier_cfg is None):
        raise FinetuneError("--reward classifier needs exactly one of --classifier FILE and --train-classifier")
    if reward != "classifier" and (classifier is not None or train_classifier_cfg is not None):
        raise FinetuneError(f"--classifier / --train-classifier set the reward: use them with --reward classifier "
                            f"(got --reward {reward})")
    if updates is not None and updates < 0:
        raise FinetuneError(f"--updates must be >= 0, got {updates}")
    out = Path(out)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise FinetuneError(f"--out {out} already holds a run; choose a new folder")
    if not recording_files(data):
        raise FinetuneError("no recordings given: --data FILE... (or folders of *.mcap)")
    cfg = HILConfig() if hil_cfg is None else hil_cfg
    cfg.learning_starts = min(cfg.learning_starts, 1)  # offline: every transition is there before the first update
    try:
        cfg.check()
        learner = RLPDLearner.from_run(run, cfg, device=device)
    except CheckpointError as e:
        raise FinetuneError(str(e)) from None
    except ValueError as e:  # HILConfig.check
        raise FinetuneError(str(e)) from None
    if learner.spec is None:
        raise FinetuneError(f"run {run} was trained on a task without a robot spec (a gymnasium id); "
                            f"robot recordings cannot finetune it")

    recs = read_recordings(data, learner.spec, "recordings")
    demo_recs = read_recordings(demos, learner.spec, "demonstrations") if demos else []
    for r in recs + demo_recs:
        if r.warning:
            note(r.warning)
    for r in recs:
        if len(r) and not r.intervened.any():
            note(f"{r.path} has no intervened transitions: its ticks go to the online buffer only")

    clf, clf_report = None, None
    if reward == "classifier":
        from s2r.policies.success import ClassifierError, SuccessClassifier

        try:
            if classifier is not None:
                clf = SuccessClassifier.load(classifier, expected_spec=learner.spec)
                clf_report = {"path": str(classifier), "trained": False, **clf.metrics}
            else:
                clf = SuccessClassifier.train(recs + demo_recs, train_classifier_cfg)
                clf_report = {"trained": True, **clf.metrics}
        except (ClassifierError, SpecError) as e:
            raise FinetuneError(str(e)) from None

    online, counts = rewarded_transitions(recs, reward, clf)
    dem, dem_counts = (rewarded_transitions(demo_recs, reward, clf) if demo_recs else
                       (None, {"transitions": 0, "no_reward": 0, "nonfinite": 0, "kept": 0}))
    if counts["nonfinite"] + dem_counts["nonfinite"]:
        note(f"dropped {counts['nonfinite'] + dem_counts['nonfinite']} transition(s) with NaN or Inf in the "
             f"observation, next observation or action")
    if counts["no_reward"] + dem_counts["no_reward"]:
        note(f"dropped {counts['no_reward'] + dem_counts['no_reward']} transition(s) without a recorded reward "
             f"(--reward recorded); robot sessions usually have none: use --reward labels or classifier")
    n_online, n_demo = counts["kept"], dem_counts["kept"]
    if n_online + n_demo == 0:
        raise FinetuneError(f"nothing to learn from: the recordings hold {counts['transitions'] + dem_counts['transitions']} "
                            f"transition(s), of which {counts['no_reward'] + dem_counts['no_reward']} have no recorded "
                            f"reward and {counts['nonfinite'] + dem_counts['nonfinite']} hold NaN or Inf")
    if reward == "labels" and not any(ep.success for r in recs + demo_recs for ep in r.episodes):
        note("no episode is labelled success: every reward is 0 (label episodes, or use another --reward)")

    if n_online:
        learner.add(online["obs"], online["action"], online["reward"], online["next_obs"],
                    online["done"].astype(np.float32), online["intervened"])
    if n_demo:
        learner.add_demos(dem["obs"], dem["action"], dem["reward"], dem["next_obs"], dem["done"].astype(np.float32))
    total = int(round(cfg.utd * (n_online + n_demo))) if updates is None else int(updates)
    if total < cfg.critic_warmup:
        note(f"{total} updates do not pass the critic warm-up ({cfg.critic_warmup} critic-only updates): the actor "
             f"does not change; give --updates above {cfg.critic_warmup} or a smaller --critic-warmup")

    last: dict[str, float] = {}
    for i in range(total):
        try:
            stats = learner.update(1)
        except FloatingPointError as e:
            raise FinetuneError(f"{e}; {out} was not written") from None
        last.update({k: float(v) for k, v in stats.items() if hasattr(v, "item") or isinstance(v, float)})
        if progress is not None:
            progress(i + 1, total)

    export_report = None
    try:
        ckpt = learner.save(out)
        if export is not None:
            from s2r.policies.export import ExportError, export_onnx

            try:
                export_report = export_onnx(ckpt, export, recorded_obs=online["obs"][:1000] if n_online else None)
            except (ExportError, ValueError, SpecError) as e:
                raise FinetuneError(f"export: {e}") from None
    except CheckpointError as e:
        raise FinetuneError(str(e)) from None
    if clf is not None and classifier is None:
        clf.save(out / CLASSIFIER_FILE)
        clf_report["path"] = str(out / CLASSIFIER_FILE)

    losses = {k: round(v, 6) for k, v in last.items()
              if k in ("critic_loss", "actor_loss", "alpha", "entropy", "q_mean") and math.isfinite(v)}
    return {
        "run": str(out), "from": str(run), "source": learner.source, "checkpoint": str(ckpt),
        "files": [r.path for r in recs], "demo_files": [r.path for r in demo_recs],
        "reward": reward, "transitions": n_online,
        "interventions": int(online["intervened"].sum()) if n_online else 0,
        "demo_transitions": n_demo, "online_buffer": len(learner.online), "demo_buffer": len(learner.demo),
        "reward_positive": int((online["reward"] > 0).sum()) if n_online else 0,
        "dropped_nonfinite": counts["nonfinite"] + dem_counts["nonfinite"],
        "dropped_no_reward": counts["no_reward"] + dem_counts["no_reward"],
        "updates": total, "critic_warmup": cfg.critic_warmup, "reused_critics": learner.reused_critics,
        "losses": losses, "classifier": clf_report,
        "export": str(export) if export_report is not None else None,
        "export_max_abs_err": (max(export_report["max_abs_err_random"], export_report["max_abs_err_recorded"] or 0.0)
                               if export_report else None),
        "wall_s": round(time.perf_counter() - t0, 2),
    }

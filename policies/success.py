"""A learned success classifier on the policy's observation: HIL-SERL's reward on a robot.

A robot has no reward function, but its operator labels episodes (success / failure, control/
recording.py `Episode.success`). From those labels this module trains p(success | obs) and turns
it into a binary reward: `rewards(obs) = 1.0 where p >= threshold`. `s2r finetune --reward
classifier` and `s2r data classifier` (s2r/finetune.py) use it; the online learner can reuse the
saved file.

Labelling (`labelled_ticks`), per labelled episode of a recording:
  positives  the last `positive_ticks` (default 5) ticks of an episode labelled success: the label
             ends the episode when the operator sees the goal reached, so its last ticks show it;
  negatives  every tick of an episode labelled failure, and the earlier ticks of a successful one
             (before the goal was reached the state did not look like success).
  Unlabelled episodes (no end, or ended without a label) are left out. The ticks just before the
  positives of a successful episode may already look nearly successful: the price of not asking
  the operator to label ticks one by one, and why the threshold is chosen on held-out episodes.

Training: a small MLP (`hidden=()` gives logistic regression) on the observation standardised with
the training ticks' mean and std (both inside the saved model), binary cross-entropy with the
positives weighted by n_negative / n_positive (class balance), Adam. Episodes, not ticks, are split
into train and held-out (stratified by label, `holdout` of each), so neighbouring ticks of one
episode never sit on both sides. The decision threshold is chosen on the held-out episodes only
(`choose_threshold`): the highest recall among thresholds whose precision is >= `min_precision`
(HIL-SERL wants few false successes: a false reward teaches the policy to stop short), and where
no threshold reaches that precision, the best F1. Precision, recall and counts on held-out and
training ticks are in `SuccessClassifier.metrics`.

File: policies/checkpoint.py's verified, atomic format, carrying the robot spec (and its hash) the
observations came from; `load` refuses a classifier made for another robot spec, naming both hashes.

Shapes: N ticks, O obs_dim.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from s2r.control.recording import Recording
from s2r.control.spec import RobotSpec, SpecError, check_spec_hash
from s2r.policies.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

FORMAT = "s2r-success-classifier-v1"


class ClassifierError(ValueError):
    """The data cannot train a classifier, or a classifier file cannot be used; the message says why."""


@dataclass
class ClassifierConfig:
    positive_ticks: int = 5  # the last K ticks of a success-labelled episode are positives
    hidden: tuple[int, ...] = (64, 64)  # MLP widths; () = logistic regression
    steps: int = 500  # Adam steps (more overfits the few labelled episodes a session gives)
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-3
    holdout: float = 0.3  # share of the success and of the failure episodes held out (at least one of each)
    min_precision: float = 0.9  # threshold: highest recall with held-out precision >= this, else best F1
    seed: int = 0

    def check(self) -> None:
        for name in ("positive_ticks", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ClassifierError(f"classifier setting {name} must be a whole number >= 1, got {v!r}")
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ClassifierError(f"classifier hidden widths must be whole numbers >= 1, got {self.hidden!r}")
        if not 0.0 < self.holdout < 1.0:
            raise ClassifierError(f"classifier holdout must be in (0, 1), got {self.holdout}")
        if not 0.0 < self.min_precision <= 1.0:
            raise ClassifierError(f"classifier min_precision must be in (0, 1], got {self.min_precision}")
        if not self.lr > 0:
            raise ClassifierError(f"classifier lr must be > 0, got {self.lr}")


class SuccessNet(nn.Module):
    """obs [N, O] raw -> logit [N]; the standardisation is part of the module (saved with it)."""

    def __init__(self, obs_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("std", torch.ones(obs_dim))
        layers: list[nn.Module] = []
        d = obs_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, obs: Tensor) -> Tensor:
        return self.mlp((obs - self.mean) / self.std).squeeze(-1)


# ---- labels and split ---------------------------------------------------------------------


@dataclass
class LabelledTicks:
    """Ticks of the labelled episodes: obs [N, O], label [N] (1 success, 0 not), episode [N] (number
    over the recordings given), and per episode number its success label."""

    obs: np.ndarray
    label: np.ndarray
    episode: np.ndarray
    episode_success: dict[int, bool]


def labelled_ticks(recordings: Sequence[Recording], positive_ticks: int = 5) -> LabelledTicks:
    """Positives and negatives of the labelled episodes (module docstring). Ticks whose observation
    holds NaN or Inf are left out."""
    obs, label, episode, success = [], [], [], {}
    number = 0
    for r in recordings:
        for ep in r.episodes:
            if ep.ended and ep.success is not None and ep.steps:
                rows = np.arange(ep.start, ep.start + ep.steps)
                y = np.zeros(ep.steps, np.float32)
                if ep.success:
                    y[-positive_ticks:] = 1.0
                ok = np.isfinite(r.obs[rows]).all(axis=1)
                obs.append(r.obs[rows][ok])
                label.append(y[ok])
                episode.append(np.full(int(ok.sum()), number, np.int64))
                success[number] = bool(ep.success)
            number += 1
    if not obs:
        return LabelledTicks(np.zeros((0, recordings[0].obs.shape[1] if recordings else 0), np.float32),
                             np.zeros(0, np.float32), np.zeros(0, np.int64), {})
    return LabelledTicks(np.concatenate(obs), np.concatenate(label), np.concatenate(episode), success)


def split_episodes(episode_success: dict[int, bool], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) episode numbers, stratified by label: round(holdout x n), at least 1 and at
    most n - 1, of the success episodes and likewise of the failure episodes go to held-out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for want in (True, False):
        eps = np.array(sorted(e for e, s in episode_success.items() if s == want), np.int64)
        rng.shuffle(eps)
        if len(eps) == 0:
            continue
        k = min(max(1, int(round(holdout * len(eps)))), len(eps) - 1) if len(eps) > 1 else 0
        held += eps[:k].tolist()
        train += eps[k:].tolist()
    return sorted(train), sorted(held)


# ---- threshold and metrics ----------------------------------------------------------------


def confusion(p: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    """Precision, recall, F1 and counts of the decision p >= threshold against labels y (1 / 0)."""
    pred, pos = p >= threshold, y > 0.5
    tp, fp = int((pred & pos).sum()), int((pred & ~pos).sum())
    fn, tn = int((~pred & pos).sum()), int((~pred & ~pos).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "accuracy": round((tp + tn) / max(1, len(y)), 4), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "ticks": int(len(y)), "positives": int(pos.sum()),
            "positive_rate": round(float(pos.mean()), 4) if len(y) else 0.0}


def choose_threshold(p: np.ndarray, y: np.ndarray, min_precision: float) -> tuple[float, str]:
    """(threshold, rule): among the decision thresholds p_i (predict success where p >= p_i), the
    one with the highest recall whose precision is >= min_precision (ties: the higher threshold);
    if none reaches it, the one with the best F1. Call it with held-out probabilities only."""
    pos = y > 0.5
    if not pos.any() or pos.all():
        raise ClassifierError("the held-out ticks need both positives and negatives to choose a threshold")
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], pos[order]
    tp, fp = np.cumsum(ys), np.cumsum(~ys)  # predicting the first i+1 as positive
    last = np.r_[ps[1:] != ps[:-1], True]  # a threshold equal to p_i predicts every tie of it too
    ps, tp, fp = ps[last], tp[last], fp[last]
    precision, recall = tp / (tp + fp), tp / pos.sum()
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    ok = precision >= min_precision
    if ok.any():
        best = np.flatnonzero(ok & (recall == recall[ok].max()))[0]  # first in descending p: highest threshold
        return float(ps[best]), f"highest recall at precision >= {min_precision:g}"
    return float(ps[int(np.argmax(f1))]), f"best F1 (no threshold reaches precision {min_precision:g})"


def _auc(p: np.ndarray, y: np.ndarray) -> float | None:
    """Area under the ROC curve (the chance of ranking a random positive above a random negative)."""
    pos, neg = p[y > 0.5], p[y <= 0.5]
    if not len(pos) or not len(neg):
        return None
    ranks = np.argsort(np.argsort(np.r_[pos, neg], kind="stable"), kind="stable") + 1.0
    allp = np.r_[pos, neg]
    for v in np.unique(allp):  # average ranks of ties
        tie = allp == v
        ranks[tie] = ranks[tie].mean()
    return round(float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))), 4)


# ---- the classifier -----------------------------------------------------------------------


class SuccessClassifier:
    """p(success | obs) with a decision threshold; see the module docstring."""

    def __init__(self, net: SuccessNet, threshold: float, spec: RobotSpec, cfg: ClassifierConfig,
                 metrics: dict | None = None):
        self.net, self.threshold, self.spec, self.cfg = net.eval(), float(threshold), spec, cfg
        self.metrics = metrics or {}
        self.obs_dim = int(net.mean.shape[0])

    @property
    def spec_hash(self) -> str:
        return self.spec.hash()

    @torch.no_grad()
    def prob(self, obs) -> np.ndarray:
        """obs [N, O] -> p(success) [N] float64 (the sigmoid in float64: float32 rounds p to 1.0 from a
        logit of about 17 on, which would tie the most confident ticks)."""
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32)).reshape(-1, self.obs_dim)
        return torch.sigmoid(self.net(x).double()).numpy()

    def rewards(self, obs) -> np.ndarray:
        """obs [N, O] -> reward [N] float32: 1.0 where p(success) >= threshold, else 0.0."""
        return (self.prob(obs) >= self.threshold).astype(np.float32)

    # ---- training -------------------------------------------------------------------------
    @classmethod
    def train(cls, recordings: Sequence[Recording], cfg: ClassifierConfig | None = None) -> SuccessClassifier:
        """Train on the labelled episodes of recordings of one robot spec; metrics in `.metrics`."""
        cfg = cfg or ClassifierConfig()
        cfg.check()
        if not recordings:
            raise ClassifierError("no recordings given to train the success classifier on")
        for r in recordings[1:]:
            check_spec_hash(r.spec_hash, recordings[0].spec, f"recording {r.path} (next to {recordings[0].path})",
                            expected_spec=r.spec.to_dict())
        data = labelled_ticks(recordings, cfg.positive_ticks)
        n_succ = sum(data.episode_success.values())
        n_fail = len(data.episode_success) - n_succ
        if n_succ < 2 or n_succ + n_fail < 3:
            raise ClassifierError(
                f"the success classifier needs at least 2 episodes labelled success and 3 labelled episodes "
                f"in all (one success for training, one held out), got {n_succ} success and {n_fail} failure "
                f"label(s) in {len(recordings)} recording(s); label episodes with the gamepad's A / B buttons "
                f"or the ~/label_success, ~/label_failure services")
        train_eps, held_eps = split_episodes(data.episode_success, cfg.holdout, cfg.seed)
        tr, ho = np.isin(data.episode, train_eps), np.isin(data.episode, held_eps)
        if not (data.label[ho] > 0.5).any() or (data.label[ho] > 0.5).all():
            raise ClassifierError("the held-out episodes hold no negative ticks: label some failures, or record "
                                  f"successful episodes longer than {cfg.positive_ticks} ticks")
        x_tr, y_tr = torch.as_tensor(data.obs[tr]), torch.as_tensor(data.label[tr])
        torch.manual_seed(cfg.seed)
        net = SuccessNet(data.obs.shape[1], cfg.hidden)
        net.mean.copy_(x_tr.mean(0))
        net.std.copy_(x_tr.std(0, unbiased=False).clamp_min(1e-6))
        n_pos = float(y_tr.sum())
        pos_weight = torch.tensor((len(y_tr) - n_pos) / max(n_pos, 1.0))  # class balance: positives count as much
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        loss = torch.zeros(())
        for _ in range(cfg.steps):
            i = torch.randint(len(y_tr), (min(cfg.batch_size, len(y_tr)),), generator=gen)
            loss = nn.functional.binary_cross_entropy_with_logits(net(x_tr[i]), y_tr[i], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        clf = cls(net, 0.5, recordings[0].spec, cfg)
        p_ho, y_ho = clf.prob(data.obs[ho]), data.label[ho]
        clf.threshold, rule = choose_threshold(p_ho, y_ho, cfg.min_precision)
        p_tr = clf.prob(data.obs[tr])
        clf.metrics = {
            "threshold": round(clf.threshold, 6), "threshold_rule": rule,
            "heldout": {**confusion(p_ho, y_ho, clf.threshold), "episodes": len(held_eps), "auc": _auc(p_ho, y_ho)},
            "train": {**confusion(p_tr, data.label[tr], clf.threshold), "episodes": len(train_eps),
                      "auc": _auc(p_tr, data.label[tr]), "final_loss": round(float(loss.detach()), 5)},
            "episodes": {"success": n_succ, "failure": n_fail},
            "heldout_episodes": held_eps, "positive_ticks": cfg.positive_ticks,
            "model": "logistic regression" if not cfg.hidden else f"MLP {list(cfg.hidden)}",
            "spec_hash": clf.spec_hash, "robot": clf.spec.name,
        }
        return clf

    # ---- file -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the classifier atomically in the verified checkpoint format, with its robot spec."""
        save_checkpoint(path, {
            "format": FORMAT, "spec_hash": self.spec_hash, "spec": json.dumps(self.spec.to_dict()),
            "obs_dim": self.obs_dim, "threshold": self.threshold,
            "config": json.dumps(dataclasses.asdict(self.cfg)), "metrics": json.dumps(self.metrics),
            "net": self.net.state_dict(),
        })

    @classmethod
    def load(cls, path: str | os.PathLike, expected_spec: RobotSpec | str | None = None) -> SuccessClassifier:
        """Read a saved classifier. expected_spec (the spec in use, or its hash): refuse one made for
        another robot spec (SpecError naming both hashes). A damaged file raises ClassifierError."""
        try:
            ck = load_checkpoint(path)
        except CheckpointError as e:
            raise ClassifierError(f"success classifier: {e}") from None
        if ck.get("format") != FORMAT:
            raise ClassifierError(f"{path} is an s2r checkpoint but not a success classifier "
                                  f"(format {ck.get('format')!r}; train one with s2r data classifier)")
        try:
            spec = RobotSpec.from_dict(json.loads(ck["spec"]))
            cfg_d = json.loads(ck["config"])
            cfg = ClassifierConfig(**{**cfg_d, "hidden": tuple(cfg_d["hidden"])})
            net = SuccessNet(int(ck["obs_dim"]), cfg.hidden)
            net.load_state_dict(ck["net"])
        except (KeyError, TypeError, ValueError, RuntimeError, SpecError) as e:
            raise ClassifierError(f"success classifier {path} is unreadable: {type(e).__name__}: {e}") from None
        if spec.hash() != ck["spec_hash"]:
            raise ClassifierError(f"success classifier {path}: its robot spec hashes to {spec.hash()}, but the "
                                  f"file records {ck['spec_hash']}; the file was edited")
        if expected_spec is not None:
            check_spec_hash(ck["spec_hash"], expected_spec, f"success classifier {path}",
                            expected_spec=spec.to_dict())
        return cls(net, float(ck["threshold"]), spec, cfg, json.loads(ck["metrics"]))


__all__ = ["ClassifierConfig", "ClassifierError", "SuccessClassifier", "SuccessNet", "LabelledTicks",
           "labelled_ticks", "split_episodes", "choose_threshold", "confusion"]

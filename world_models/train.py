"""Training and fidelity metrics for world models; shared by `s2r wm train/eval`, finetuning and the bench.

    train_diffusion(model, data, cfg)      EDM loss on windows of k steps (AdamW, cosine decay, grad clip)
    one_step_error / horizon_errors        normalised RMSE of one step / open-loop H steps on held-out data
    failure_agreement                      does the model predict the falls the held-out rollouts show?
    uncertainty_calibration                correlation of u(s, a) with the real one-step error
    return_gap                             closed loop: a fixed policy's imagined vs real return from real states

Every metric takes a `Stepper`: (states [B, k, S], actions [B, k, A]) -> (next_state [B, S], reward [B],
terminated [B] bool), so the diffusion model and the ensemble baseline are measured by the same code.
Errors are RMSE over state dims in units of each dim's std in the held-out data (dims that are constant
there are left out), so 1.0 means "as far off as a random state from the data".
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from s2r.io import atomic_write_bytes
from s2r.world_models.data import Transitions, windows
from s2r.world_models.diffusion import DiffusionWorldModel

Stepper = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


@dataclass
class FitConfig:
    steps: int = 3000  # gradient steps
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    seed: int = 0


def train_diffusion(model: DiffusionWorldModel, data: Transitions, cfg: FitConfig, fit_normalizers: bool = True,
                    log: Callable[[int, float], None] | None = None, log_every: int = 50) -> list[tuple[int, float]]:
    """Fit the denoiser on every full-history window of `data`; -> [(step, mean loss since last log)].

    fit_normalizers=False keeps the model's statistics (continued training on new data). A sim-prior model needs
    data.prior (Transitions.with_prior)."""
    states, actions, nxt, rew, term, rows = windows(data, model.cfg.history)
    prior = None
    if getattr(model.cfg, "sim_prior", False):
        if data.prior is None:
            raise ValueError("this world model corrects a simulator (sim_prior): its data needs the simulator's next "
                             "states (Transitions.with_prior(SimPrior))")
        prior = data.prior[rows]
    if len(states) < 2:
        raise ValueError(f"only {len(states)} transitions have {model.cfg.history} steps of history inside their "
                         f"episode; collect more data or lower the history")
    if fit_normalizers:
        model.fit_normalizers(data.state, data.next_state, data.reward, data.prior if prior is not None else None)
    L = getattr(model.cfg, "context_noise", 0.0)
    with torch.no_grad():
        cond = model.condition(states, actions, prior=prior) if L == 0 else None  # [M, C]; noise: per batch
        x0 = model.target(states[:, -1], nxt, rew, term, prior)  # [M, D]: the clean transition, noise or not
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps)))
    model.train()
    history, acc, n = [], 0.0, 0
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(x0), (cfg.batch_size,), generator=gen)
        if L == 0:
            c = cond[idx]
        else:
            with torch.no_grad():
                noisy, level = context_noise(states[idx], L, model.state_std, gen)
                c = model.condition(noisy, actions[idx], level, prior[idx] if prior is not None else None)
        loss = model.loss(x0[idx], c, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"world model loss is {float(loss)} at step {step}: the data holds NaN/Inf "
                                     f"or the learning rate {cfg.lr} is too high")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for net in model.member_nets():  # each member's own norm: one member's spike does not shrink the others'
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        acc, n = acc + float(loss.detach()), n + 1
        if step % log_every == 0 or step == cfg.steps:
            history.append((step, acc / n))
            if log is not None:
                log(step, acc / n)
            acc, n = 0.0, 0
    model.eval()
    return history


def context_noise(states: Tensor, L: float, state_std: Tensor, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor]:
    """states [B, k, S] -> (states + level * state_std * N(0, 1) [B, k, S], level [B] ~ U(0, L)): the training
    noise of WorldModelConfig.context_noise, one level per row on all k context states."""
    level = torch.rand(states.shape[0], generator=generator) * L
    noise = torch.randn(states.shape, generator=generator) * level[:, None, None] * state_std
    return states + noise, level


def diffusion_stepper(model: DiffusionWorldModel, steps: int = 3, solver: str = "euler",
                      generator: torch.Generator | None = None, sim=None, mean_of: int = 1) -> Stepper:
    """sim: the SimPrior a sim-prior model corrects (None for a plain model). mean_of > 1: each step
    predicts the mean of that many samples (the model's expected next state) instead of one sample."""
    def step(states: Tensor, actions: Tensor):
        prior = sim.predict(states[:, -1], actions[:, -1]) if sim is not None else None
        p = model.predict(states, actions, steps=steps, solver=solver, generator=generator, prior=prior,
                          samples=mean_of, mean=mean_of > 1)
        return p.next_state, p.reward, p.terminated

    return step


# ---- metrics ------------------------------------------------------------------------------------


def state_scale(data: Transitions) -> tuple[Tensor, Tensor]:
    """(std [S], used [S] bool): per-dim std of the data's next states; dims constant in it are not scored."""
    std = data.next_state.std(0)
    return std.clamp_min(1e-8), std > 1e-6


def _nrmse(pred: Tensor, true: Tensor, std: Tensor, used: Tensor) -> Tensor:
    """[B]: RMSE over the used dims, each in units of its std."""
    return (((pred - true) / std)[:, used] ** 2).mean(-1).sqrt()


@torch.no_grad()
def one_step_error(step: Stepper, held: Transitions, k: int, max_rows: int = 4096) -> dict:
    states, actions, nxt, _, _, _ = windows(held, k)
    states, actions, nxt = states[:max_rows], actions[:max_rows], nxt[:max_rows]
    std, used = state_scale(held)
    pred, _, _ = step(states, actions)
    e = _nrmse(pred, nxt, std, used)
    return {"one_step_error": float(e.mean()), "one_step_error_median": float(e.median()), "rows": len(e)}


def _segment_starts(held: Transitions, k: int, H: int, stride: int) -> Tensor:
    """Rows i with rows i-k+1 .. i+H-1 in one episode (a full history and H real steps after it)."""
    N = len(held)
    i = torch.arange(k - 1, N - H + 1)
    ok = torch.ones(len(i), dtype=torch.bool)
    for j in range(-(k - 1), H):
        ok &= held.episode[i + j] == held.episode[i]
    return i[ok][::stride]


@torch.no_grad()
def horizon_errors(step: Stepper, held: Transitions, k: int, H: int = 50, stride: int = 5, max_segments: int = 2048,
                   clamp: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Open-loop error [H]: the model's own predictions feed its history, the real actions drive it.
    clamp=(lo [S], hi [S]) clamps each predicted state (as the imagined env does)."""
    starts = _segment_starts(held, k, H, stride)[:max_segments]
    if len(starts) == 0:
        raise ValueError(f"no held-out segment has {k - 1} steps of history and {H} steps after it; "
                         f"hold out longer episodes or lower H")
    std, used = state_scale(held)
    back = torch.arange(k - 1, -1, -1)
    hist_s = held.state[starts[:, None] - back]  # [B, k, S]
    hist_a = held.action[starts[:, None] - back]  # [B, k, A]
    errs = []
    for h in range(H):
        nxt, _, _ = step(hist_s, hist_a)
        if clamp is not None:
            nxt = torch.maximum(torch.minimum(nxt, clamp[1]), clamp[0])
        nxt = torch.nan_to_num(nxt, nan=0.0, posinf=1e6, neginf=-1e6)
        errs.append(_nrmse(nxt, held.next_state[starts + h], std, used).mean())
        if h + 1 < H:
            hist_s = torch.cat([hist_s[:, 1:], nxt[:, None]], 1)
            hist_a = torch.cat([hist_a[:, 1:], held.action[starts + h + 1][:, None]], 1)
    return torch.stack(errs)


@torch.no_grad()
def failure_agreement(step: Stepper, held: Transitions, k: int, H: int = 25, stride: int = 10,
                      max_segments: int = 2048, fallen: Callable[[Tensor], Tensor] | None = None) -> dict:
    """From held-out states, roll the model open-loop with the real actions for up to H steps (or to the
    episode's real end). A real fall: the episode terminated inside the window. A predicted fall: the
    model's termination (or fallen(state) [B] bool, the safe-set test) fired inside it.
    -> counts, recall of real falls, false-alarm rate, and missed falls (the dangerous case)."""
    N = len(held)
    i = torch.arange(k - 1, N)
    ok = torch.ones(len(i), dtype=torch.bool)
    for j in range(1, k):
        ok &= held.episode[i - j] == held.episode[i]
    starts = i[ok][::stride][:max_segments]
    B = len(starts)
    back = torch.arange(k - 1, -1, -1)
    hist_s, hist_a = held.state[starts[:, None] - back], held.action[starts[:, None] - back]
    alive = torch.ones(B, dtype=torch.bool)  # the real episode still runs at step h
    real = torch.zeros(B, dtype=torch.bool)
    pred = torch.zeros(B, dtype=torch.bool)
    for h in range(H):
        row = (starts + h).clamp_max(N - 1)
        alive &= (starts + h < N) & (held.episode[row] == held.episode[starts])
        nxt, _, term = step(hist_s, hist_a)
        if fallen is not None:
            term = term | fallen(nxt)
        pred |= term & alive
        real |= held.terminated[row] & alive
        alive &= ~held.terminated[row]
        nxt_row = (row + 1).clamp_max(N - 1)
        hist_s = torch.cat([hist_s[:, 1:], nxt[:, None]], 1)
        hist_a = torch.cat([hist_a[:, 1:], held.action[nxt_row][:, None]], 1)
    n_real, n_safe = int(real.sum()), int((~real).sum())
    return {"windows": B, "horizon": H, "real_falls": n_real, "predicted_falls": int(pred.sum()),
            "fall_recall": float((pred & real).sum()) / n_real if n_real else float("nan"),
            "missed_falls": int((~pred & real).sum()),
            "false_alarm_rate": float((pred & ~real).sum()) / n_safe if n_safe else float("nan")}


@torch.no_grad()
def return_gap(step: Stepper, act: Callable[[Tensor], Tensor], held: Transitions, k: int, H: int = 25,
               stride: int = 5, max_segments: int = 1024, clamp: tuple[Tensor, Tensor] | None = None,
               fallen: Callable[[Tensor], Tensor] | None = None) -> dict:
    """Closed loop, as imagination runs a policy: from real windows of `held` (rollouts of the same fixed
    policy `act`: policy observation [B, O] -> action [B, A]), the policy acts on the model's own states for
    up to H steps. Real return: the rewards the rollout got over the same steps. Both stop at a fall (real
    termination; the model's termination or fallen(state)). Windows whose episode was cut by a time limit
    or by the end of the data before H steps are left out.
    -> mean returns, relative gap (imagined - real) / |real|, their Pearson correlation over windows, and
    the share of windows that fall, real and imagined."""
    from s2r.control.observations import ObservationBuilder

    N = len(held)
    ep = held.episode
    last = torch.empty(N, dtype=torch.long)  # last row of each row's episode
    nxt_ep = torch.cat([ep[1:] != ep[:-1], torch.tensor([True])])
    end = N - 1
    for i in range(N - 1, -1, -1):
        if nxt_ep[i]:
            end = i
        last[i] = end
    i = torch.arange(k - 1, N)
    ok = torch.ones(len(i), dtype=torch.bool)
    for j in range(1, k):
        ok &= ep[i - j] == ep[i]
    ok &= (last[i] - i + 1 >= H) | held.terminated[last[i]]
    starts = i[ok][::stride][:max_segments]
    if len(starts) == 0:
        raise ValueError(f"no held-out window has {k - 1} steps of history and {H} steps (or a fall) after it")
    B = len(starts)
    spec = held.spec
    builder = (ObservationBuilder(spec.observation, B, xp="torch")
               if spec is not None and held.obs_key == "critic" else None)
    frame = spec.observation.frame_dim if builder is not None else held.state.shape[1]
    back = torch.arange(k - 1, -1, -1)
    hist_s = held.state[starts[:, None] - back]  # [B, k, S]
    hist_a = held.action[starts[:, None] - back][:, :-1]  # [B, k-1, A]: the policy picks the k-th
    obs = hist_s[:, -1]
    for j in range(k):  # the policy's observation history from the real window
        obs = builder.push(hist_s[:, j, :frame]) if builder is not None else hist_s[:, j]
    real_ret, imag_ret = torch.zeros(B), torch.zeros(B)
    real_alive, imag_alive = torch.ones(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)
    real_fell, imag_fell = torch.zeros(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
    for h in range(H):
        row = (starts + h).clamp_max(N - 1)
        real_alive &= (starts + h <= last[starts])
        real_ret += torch.where(real_alive, held.reward[row], 0.0)
        real_fell |= real_alive & held.terminated[row]
        real_alive &= ~held.terminated[row]
        acts = torch.cat([hist_a, act(obs)[:, None]], 1)  # [B, k, A]
        nxt, r, term = step(hist_s, acts)
        if clamp is not None:
            nxt = torch.maximum(torch.minimum(nxt, clamp[1]), clamp[0])
        if fallen is not None:
            term = term | fallen(nxt)
        imag_ret += torch.where(imag_alive, torch.nan_to_num(r), 0.0)
        imag_fell |= imag_alive & term
        imag_alive &= ~term
        hist_s, hist_a = torch.cat([hist_s[:, 1:], nxt[:, None]], 1), acts[:, 1:]
        obs = builder.push(nxt[:, :frame]) if builder is not None else nxt
    real_mean, imag_mean = float(real_ret.mean()), float(imag_ret.mean())
    return {"windows": B, "horizon": H, "real_return_mean": real_mean, "imagined_return_mean": imag_mean,
            "relative_gap": (imag_mean - real_mean) / max(abs(real_mean), 1e-9),
            "return_pearson": _pearson(imag_ret, real_ret),
            "real_fall_share": float(real_fell.float().mean()), "imagined_fall_share": float(imag_fell.float().mean())}


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def _ranks(x: Tensor) -> Tensor:
    r = torch.empty(len(x), dtype=torch.float64)
    r[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
    return r


@torch.no_grad()
def uncertainty_calibration(u_and_pred: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], held: Transitions,
                            k: int, max_rows: int = 4096) -> dict:
    """Pearson and Spearman correlation between u(s, a) [B] and the one-step error [B] of the prediction
    made with it, on held-out rows. u_and_pred(states, actions) -> (u [B], next_state [B, S])."""
    states, actions, nxt, _, _, _ = windows(held, k)
    states, actions, nxt = states[:max_rows], actions[:max_rows], nxt[:max_rows]
    std, used = state_scale(held)
    u, pred = u_and_pred(states, actions)
    err = _nrmse(pred, nxt, std, used)
    return {"u_error_pearson": _pearson(u, err), "u_error_spearman": _pearson(_ranks(u), _ranks(err)),
            "u_mean": float(u.mean()), "rows": len(u)}


def diffusion_uncertainty(model: DiffusionWorldModel, samples: int = 8, steps: int = 3, solver: str = "euler",
                          generator: torch.Generator | None = None, sim=None
                          ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    def f(states: Tensor, actions: Tensor):
        prior = sim.predict(states[:, -1], actions[:, -1]) if sim is not None else None
        p = model.predict(states, actions, steps=steps, solver=solver, samples=samples, generator=generator,
                          prior=prior)
        return p.uncertainty, p.next_state

    return f


# ---- plots --------------------------------------------------------------------------------------


def plot_png(path: str | Path, curves: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str,
             logy: bool = False) -> None:
    """One figure of named (x, y) curves, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def timed(f: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0

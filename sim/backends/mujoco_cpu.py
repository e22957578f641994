"""CPU backend: the MuJoCo C engine through `mujoco.rollout` with a persistent thread pool.

Why rollout: `mujoco.mj_step` holds the GIL, so Python threads do not scale;
`rollout` steps a whole batch (nstep = decimation physics steps per env) in C++
threads with the GIL released. One call per control step; state and
sensordata come back in preallocated arrays that torch views without copying.
"""

from __future__ import annotations

import copy
import os

import mujoco
import numpy as np
import torch
from mujoco import rollout

from s2r.sim.backends.base import Backend

STATE_SPEC = mujoco.mjtState.mjSTATE_FULLPHYSICS


class MujocoBackend(Backend):
    name = "mujoco"

    def __init__(self, model: mujoco.MjModel, num_envs: int, nthread: int | None = None,
                 max_qvel: float = 1e3):
        super().__init__(model, num_envs, torch.device("cpu"))
        m = model
        self.nthread = nthread if nthread is not None else (os.cpu_count() or 1)
        self.nthread = max(1, min(self.nthread, num_envs))
        # nthread == 1: run on the calling thread (no pool, no handoff latency)
        self._pool = rollout.Rollout(nthread=0 if self.nthread == 1 else self.nthread)
        self._datas = [mujoco.MjData(m) for _ in range(self.nthread)]
        self._models: list[mujoco.MjModel] = [m] * num_envs  # per-env copies once randomised
        self._own_models = False
        self.nstate = mujoco.mj_stateSize(m, STATE_SPEC)
        self.max_qvel = max_qvel
        self.dt = m.opt.timestep

        self.state = np.zeros((num_envs, self.nstate))  # [N, nstate]: time, qpos, qvel, act, ...
        d = self._datas[0]
        mujoco.mj_resetData(m, d)
        mujoco.mj_getState(m, d, self.state[0], STATE_SPEC)
        self.state[:] = self.state[0]
        # the state mj_resetData leaves (its qpos, qvel are replaced at each reset); the randomised
        # fields (RANDOMIZABLE_FIELDS) do not enter it, so it holds for every env's model copy
        self._reset_state = self.state[0].copy()  # [nstate]
        self._sens = np.zeros((num_envs, m.nsensordata))  # [N, nsensordata]
        self._out: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        st = torch.from_numpy(self.state)
        self.time = st[:, 0]
        self.qpos = st[:, 1:1 + m.nq]
        self.qvel = st[:, 1 + m.nq:1 + m.nq + m.nv]
        self._sensordata = torch.from_numpy(self._sens)
        # envs reset since the last step whose sensors are not computed yet: env id -> the state row
        # [nstate] it was reset to. Resets are frequent, reads before the next step rare (the step
        # recomputes every env's sensors), so mj_forward runs when a reader asks (`sensordata`).
        self._unsensed: dict[int, np.ndarray] = {}
        self._ctrl_buf: np.ndarray | None = None

    @property
    def max_qvel(self) -> float:
        """Beyond this |qvel| (rad/s or m/s) an env counts as diverged."""
        return self._max_qvel

    @max_qvel.setter
    def max_qvel(self, value: float) -> None:
        self._max_qvel = value
        # [nq + nv] bounds on |qpos|, |qvel|: only NaN and Inf exceed the first, the second also catches a
        # runaway velocity (one comparison for the step's divergence test)
        m = self.model
        self._state_limit = np.concatenate([np.full(m.nq, np.finfo(np.float64).max), np.full(m.nv, value)])

    @property
    def sensordata(self) -> torch.Tensor:
        """[N, nsensordata] from the last physics step; for envs reset since, those of the state they
        were reset to (computed on this first read)."""
        if self._unsensed:
            self._sense_reset_envs()
        return self._sensordata

    def _sense_reset_envs(self) -> None:
        d, nq, nv = self._datas[0], self.model.nq, self.model.nv
        for i, row in self._unsensed.items():
            m = self._models[i]
            mujoco.mj_resetData(m, d)
            d.qpos[:] = row[1:1 + nq]
            d.qvel[:] = row[1 + nq:1 + nq + nv]
            mujoco.mj_forward(m, d)  # sensors of the new state
            self._sens[i] = d.sensordata
        self._unsensed.clear()

    def _buffers(self, nstep: int) -> tuple[np.ndarray, np.ndarray]:
        if nstep not in self._out:
            self._out[nstep] = (np.zeros((self.num_envs, nstep, self.nstate)),
                                np.zeros((self.num_envs, nstep, self.model.nsensordata)))
        return self._out[nstep]

    def step(self, ctrl: torch.Tensor) -> torch.Tensor:
        n, nstep, nu = ctrl.shape
        state_out, sens_out = self._buffers(nstep)
        ctrl_np = ctrl.detach().to("cpu", torch.float64).numpy()
        if not ctrl_np.flags.c_contiguous:
            ctrl_np = np.ascontiguousarray(ctrl_np)
        t_expected = self.time.numpy() + nstep * self.dt
        self._pool.rollout(self._models, self._datas, self.state, ctrl_np, nstep=nstep,
                           state=state_out, sensordata=sens_out, skip_checks=True)
        np.copyto(self.state, state_out[:, -1])
        np.copyto(self._sens, sens_out[:, -1])
        self._unsensed.clear()  # every env's sensors are now the step's
        # MuJoCo resets a diverging mjData itself (time goes back to ~0); catch that and NaNs
        st = self.state[:, 1:1 + self.model.nq + self.model.nv]
        bad = (self.state[:, 0] < t_expected - 0.5 * self.dt)  # MuJoCo's own reset
        within = np.abs(st) <= self._state_limit  # [N, nq + nv]: False at NaN, Inf, runaway qvel
        if not within.all():  # rare: then per env (the row-wise all() costs more than the test)
            bad |= ~within.all(axis=1)
        self.diverged_total += int(np.count_nonzero(bad))
        return torch.from_numpy(bad)

    def reset_envs(self, env_ids: torch.Tensor, qpos: torch.Tensor, qvel: torch.Tensor) -> None:
        ids = env_ids.cpu().numpy()
        qpos_np = qpos.detach().to("cpu", torch.float64).numpy()  # [k, nq]
        qvel_np = qvel.detach().to("cpu", torch.float64).numpy()  # [k, nv]
        m = self.model
        # mj_resetData's state (time 0, act 0, ...) with the new qpos, qvel: one write for all k envs
        rows = np.repeat(self._reset_state[None], len(ids), axis=0)  # [k, nstate]
        rows[:, 1:1 + m.nq] = qpos_np
        rows[:, 1 + m.nq:1 + m.nq + m.nv] = qvel_np
        self.state[ids] = rows
        if m.nsensordata:  # mj_forward would compute sensors only (the state it leaves is the same): on first read
            self._unsensed.update(zip(ids.tolist(), rows))

    def set_params(self, env_ids: torch.Tensor, params: dict[str, np.ndarray]) -> None:
        if self._unsensed:  # their sensors belong to the model they were reset on
            self._sense_reset_envs()
        if not self._own_models:
            self._models = [copy.copy(self.model) for _ in range(self.num_envs)]
            self._own_models = True
        for k, i in enumerate(env_ids.tolist()):
            m = self._models[i]
            for field, values in params.items():
                getattr(m, field)[...] = values[k]

    def env_model(self, i: int) -> mujoco.MjModel:
        return self._models[i]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

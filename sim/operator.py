"""A scripted operator for simulated correction sessions: a person at a gamepad, in code.

It watches the simulated arm (privileged sim state: where the cube and the target really are),
lets the policy act, takes over when the policy drifts, and hands back once it has made progress,
following HIL-SERL's guidance (../shared/ALGORITHMS.md): let the policy act 20-30 steps first,
take over when it stops making progress, intervene less as it improves (that follows by itself:
a better policy drifts less). Like a person it reacts late (a reaction delay of 200-300 ms before
each takeover and hand-back) and its stick is noisy.

Its output is a sensor_msgs/Joy-shaped message per env (axes, buttons) that goes through the same
`control.operator.Arbiter` the ROS policy node uses: hold LB to intervene, left/right sticks for
the end effector, X/Y for the gripper. A bench calls `Arbiter.update_joy(*operator.joy(i), t)`;
the ROS end-to-end run publishes the same numbers on /joy.

Shapes: N envs; torch tensors from the task, numpy out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from s2r.control.operator import JoyMapping


@dataclass
class OperatorConfig:
    control_hz: float = 50.0
    reaction_s: tuple[float, float] = (0.2, 0.3)  # delay before each takeover and hand-back, uniform
    noise: float = 0.1  # std of the stick noise, in action units
    grace_s: float = 0.5  # let the policy act this long at the start of an episode
    patience_s: float = 1.0  # no progress for this long: the policy drifts, take over
    progress_m: float = 0.01  # what counts as progress: the task potential improves by this much
    min_hold_s: float = 0.5  # once acting, act at least this long
    handback_m: float = 0.03  # ... and until the potential improved this much since the takeover,
    # and not in the middle of a grasp (descending or closing): a person finishes the grasp first
    seed: int = 0


class ScriptedPickOperator:
    """Corrects arm-pick (or arm-reach) policies in N simulated envs; see the module docstring."""

    IDLE, WAIT_IN, ACTING, WAIT_OUT = 0, 1, 2, 3

    def __init__(self, env, cfg: OperatorConfig | None = None, joy: JoyMapping | None = None):
        self.env, self.task = env, env.task
        self.cfg = cfg or OperatorConfig()
        self.joy_map = joy or JoyMapping()
        self.pick = hasattr(self.task, "cube_pos")
        n = env.num_envs
        self.rng = np.random.default_rng(self.cfg.seed)
        self.state = np.zeros(n, np.int64)  # IDLE / WAIT_IN / ACTING / WAIT_OUT per env
        self.timer = np.zeros(n, np.int64)  # steps left in the current wait, or steps acting
        self.ep_step = np.zeros(n, np.int64)
        self.best = np.full(n, -np.inf)  # best potential this episode
        self.best_at = np.zeros(n, np.int64)  # ep_step at which it was reached
        self.start_pot = np.zeros(n)  # potential when the current takeover began
        self.phase = np.zeros(n, np.int64)  # the expert's stage while acting (pick)
        self.phase_steps = np.zeros(n, np.int64)
        self.takeovers = 0
        hz = self.cfg.control_hz
        self._grace, self._patience = int(self.cfg.grace_s * hz), int(self.cfg.patience_s * hz)
        self._min_hold = int(self.cfg.min_hold_s * hz)

    def _delay(self) -> int:
        lo, hi = self.cfg.reaction_s
        return int(round(self.rng.uniform(lo, hi) * self.cfg.control_hz))

    # ---- what the operator sees ---------------------------------------------------------------
    def _state(self):
        ee = self.task.ee_pos().double()  # [N, 3]
        if not self.pick:
            return ee, None, self.task.target.double()
        return ee, self.task.cube_pos().double(), self.task.target.double()

    def potential(self) -> np.ndarray:
        """[N] how far along the task is, in metres (higher is better): reach the cube, lift, place."""
        ee, cube, target = self._state()
        if cube is None:
            return (-(ee - target).norm(dim=1)).numpy()
        lifted = cube[:, 2] > self.task.cube_rest_z + self.task.cfg.lift_height
        reach = -(ee - cube).norm(dim=1)
        place = -(cube - target).norm(dim=1)
        return torch.where(lifted, 1.0 + place, reach + place - 1.0).numpy()

    def expert_action(self) -> np.ndarray:
        """[N, A] what the operator steers towards: the staged pick (above, descend, close, carry)."""
        ee, cube, target = self._state()
        a = np.zeros((self.env.num_envs, self.env.action_dim))
        if cube is None:
            a[:, :3] = ((target - ee) / self.task.ee_scale).clamp(-1, 1).numpy()
            if a.shape[1] > 3:
                a[:, 3] = 1.0
            return a
        above = cube + torch.tensor([0.0, 0.0, 0.08], dtype=cube.dtype)
        ph = torch.as_tensor(self.phase)
        goal = torch.where((ph == 0)[:, None], above, cube)
        goal = torch.where((ph >= 3)[:, None], target, goal)
        near = (goal - ee).norm(dim=1).numpy()
        nxt = self.phase.copy()
        nxt[(self.phase == 0) & (near < 0.01)] = 1
        nxt[(self.phase == 1) & (near < 0.006)] = 2
        nxt[(self.phase == 2) & (self.phase_steps > 15)] = 3
        self.phase_steps = np.where(nxt != self.phase, 0, self.phase_steps + 1)
        self.phase = nxt
        a[:, :3] = ((goal - ee) / self.task.ee_scale).clamp(-1, 1).numpy()
        a[self.phase == 2, :3] = 0.0
        a[:, 3] = np.where(self.phase >= 2, -1.0, 1.0)
        return a

    def _phase_from_state(self, i: int) -> int:
        """Where the expert picks up when it takes over env i: carrying if the cube is in the hand."""
        ee, cube, _ = self._state()
        if cube is None:
            return 0
        held = (cube[i, 2] > self.task.cube_rest_z + 0.01) and float((ee[i] - cube[i]).norm()) < 0.03
        return 3 if held else 0

    # ---- one control tick ---------------------------------------------------------------------
    def step(self, teleoperate: bool = False) -> np.ndarray:
        """Advance every env's operator one tick; -> acting [N] bool (who holds the intervene button).
        teleoperate: drive every env all the time (recording demonstrations before a session)."""
        if teleoperate:
            self.state[:] = self.ACTING
            self._expert = self.expert_action()
            return np.ones(self.env.num_envs, bool)
        pot = self.potential()
        self.ep_step += 1
        better = pot > self.best + self.cfg.progress_m
        self.best_at = np.where(better, self.ep_step, self.best_at)
        self.best = np.where(better, pot, np.maximum(self.best, pot))
        for i in range(self.env.num_envs):
            s = self.state[i]
            if s == self.IDLE:
                drifting = self.ep_step[i] > self._grace and self.ep_step[i] - self.best_at[i] > self._patience
                if drifting and not self._done(i):
                    self.state[i], self.timer[i] = self.WAIT_IN, self._delay()
            elif s == self.WAIT_IN:
                self.timer[i] -= 1
                if self.timer[i] <= 0:
                    self.state[i], self.timer[i] = self.ACTING, 0
                    self.start_pot[i] = pot[i]
                    self.phase[i], self.phase_steps[i] = self._phase_from_state(i), 0
                    self.takeovers += 1
            elif s == self.ACTING:
                self.timer[i] += 1
                # hand back after real progress, never in the middle of a grasp (descend, close)
                steady = self.phase[i] in (0, 3)
                if (self.timer[i] >= self._min_hold and steady and pot[i] > self.start_pot[i] + self.cfg.handback_m) \
                        or self._done(i):
                    self.state[i], self.timer[i] = self.WAIT_OUT, self._delay()
            elif s == self.WAIT_OUT:
                self.timer[i] -= 1
                if self.timer[i] <= 0:
                    self.state[i] = self.IDLE
                    self.best_at[i] = self.ep_step[i]  # give the policy its patience again
        self._expert = self.expert_action()  # [N, A] keeps the expert's stages current every tick
        return self.state >= self.ACTING  # ACTING or WAIT_OUT: the button is still held

    def _done(self, i: int) -> bool:
        return bool(self.task.success()[i])

    def joy(self, i: int, acting: bool) -> tuple[list[float], list[int]]:
        """Env i's gamepad this tick: (axes, buttons) as sensor_msgs/Joy carries them."""
        m = self.joy_map
        axes = [0.0] * 8
        buttons = [0] * 11
        if acting:
            a = self._expert[i] + self.rng.normal(0.0, self.cfg.noise, self._expert.shape[1]) * (
                np.arange(self._expert.shape[1]) < 3)
            for axis, ch, sc in zip(m.axes, m.channels, m.scale):
                v = float(np.clip(a[ch] / sc, -1.0, 1.0))
                # undo the deadzone rescaling so that the arbiter's output is the operator's intent
                axes[axis] = float(np.sign(v) * (m.deadzone + (1 - m.deadzone) * abs(v))) if v else 0.0
            buttons[m.intervene_button] = 1
            grip = m.gripper_close_button if self._expert[i, 3] < 0 else m.gripper_open_button
            buttons[grip] = 1
        return axes, buttons

    def reset(self, env_ids) -> None:
        """New episodes in env_ids: the operator lets go and waits out the grace period."""
        ids = np.asarray(env_ids, dtype=np.int64)
        self.state[ids] = self.IDLE
        self.ep_step[ids] = 0
        self.best[ids] = -np.inf
        self.best_at[ids] = 0
        self.phase[ids] = 0
        self.phase_steps[ids] = 0

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
the ROS end-to-end run (s2r/ros/scripted_operator.py) publishes the same numbers on /joy.

Two layers:
  ScriptedOperator      numpy only: the person (when to take over and hand back, reaction delays,
                        stick noise) and the staged expert (`pick_expert`), fed with positions in
                        the arm's base frame: end effector, cube (None for reach), target. The ROS
                        scripted operator feeds it from /joint_states (the arm's FK), /object_pose
                        and /goal_pose.
  ScriptedPickOperator  the same over a simulated env's task (privileged sim state).

Shapes: N envs; positions [N, 3] float64 numpy; torch tensors from the task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    gain: float = 1.0  # stick deflection per ee_scale of distance to the expert's goal (1: close the gap in a tick);
    # below 1 over a real loop, whose commands reach the arm a few ticks late (s2r/ros/scripted_operator.py)
    max_stick: float = 1.0  # the largest stick deflection (action units) the operator uses
    seed: int = 0


@dataclass
class PickGeometry:
    """What the pick expert and potential need to know about the scene (ArmPick's config)."""

    cube_rest_z: float  # m, the cube's resting height
    lift_height: float = 0.02  # m above rest: lifted


def pick_potential(ee: np.ndarray, cube: np.ndarray | None, target: np.ndarray,
                   geometry: PickGeometry | None = None) -> np.ndarray:
    """[N] how far along the task is, in metres (higher is better): reach the target (cube None), or
    reach the cube, lift, place. ee, cube, target [N, 3]."""
    if cube is None:
        return -np.linalg.norm(ee - target, axis=1)
    lifted = cube[:, 2] > geometry.cube_rest_z + geometry.lift_height
    reach = -np.linalg.norm(ee - cube, axis=1)
    place = -np.linalg.norm(cube - target, axis=1)
    return np.where(lifted, 1.0 + place, reach + place - 1.0)


def pick_expert(ee: np.ndarray, cube: np.ndarray | None, target: np.ndarray, phase: np.ndarray,
                phase_steps: np.ndarray, ee_scale: np.ndarray, action_dim: int, gain: float = 1.0,
                max_stick: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the operator steers towards -> (action [N, A], phase [N], phase_steps [N]).

    Reach (cube None): straight at the target, gripper open. Pick: the staged pick (0 above the cube,
    1 descend, 2 close, 3 carry to the target). ee_scale [3]: metres per unit action; gain: action per
    ee_scale of distance, clipped to [-max_stick, max_stick]."""
    n = ee.shape[0]
    a = np.zeros((n, action_dim))
    if cube is None:
        a[:, :3] = np.clip(gain * (target - ee) / ee_scale, -max_stick, max_stick)
        if action_dim > 3:
            a[:, 3] = 1.0
        return a, phase, phase_steps
    above = cube + np.array([0.0, 0.0, 0.08])
    goal = np.where((phase == 0)[:, None], above, cube)
    goal = np.where((phase >= 3)[:, None], target, goal)
    near = np.linalg.norm(goal - ee, axis=1)
    nxt = phase.copy()
    nxt[(phase == 0) & (near < 0.01)] = 1
    nxt[(phase == 1) & (near < 0.006)] = 2
    nxt[(phase == 2) & (phase_steps > 15)] = 3
    phase_steps = np.where(nxt != phase, 0, phase_steps + 1)
    a[:, :3] = np.clip(gain * (goal - ee) / ee_scale, -max_stick, max_stick)
    a[nxt == 2, :3] = 0.0
    a[:, 3] = np.where(nxt >= 2, -1.0, 1.0)
    return a, nxt, phase_steps


class ScriptedOperator:
    """The person at the gamepad for N arms (numpy); see the module docstring.

    Each tick: step(ee, cube, target, done) -> acting [N]; then joy(i, acting[i]) per env."""

    IDLE, WAIT_IN, ACTING, WAIT_OUT = 0, 1, 2, 3

    def __init__(self, num_envs: int, action_dim: int, ee_scale, cfg: OperatorConfig | None = None,
                 joy: JoyMapping | None = None, geometry: PickGeometry | None = None):
        self.cfg = cfg or OperatorConfig()
        self.joy_map = joy or JoyMapping()
        self.n, self.action_dim = num_envs, action_dim
        self.ee_scale = np.asarray(ee_scale, dtype=np.float64)  # [3]
        self.geometry = geometry  # needed for pick (a cube)
        n = num_envs
        self.rng = np.random.default_rng(self.cfg.seed)
        self.state = np.zeros(n, np.int64)  # IDLE / WAIT_IN / ACTING / WAIT_OUT per env
        self.timer = np.zeros(n, np.int64)  # steps left in the current wait, or steps acting
        self.ep_step = np.zeros(n, np.int64)
        self.best = np.full(n, -np.inf)  # best potential this episode
        self.best_at = np.zeros(n, np.int64)  # ep_step at which it was reached
        self.start_pot = np.zeros(n)  # potential when the current takeover began
        self.phase = np.zeros(n, np.int64)  # the expert's stage while acting (pick)
        self.phase_steps = np.zeros(n, np.int64)
        self.expert = np.zeros((n, action_dim))  # [N, A] the expert's action this tick
        self.takeovers = 0
        hz = self.cfg.control_hz
        self._grace, self._patience = int(self.cfg.grace_s * hz), int(self.cfg.patience_s * hz)
        self._min_hold = int(self.cfg.min_hold_s * hz)

    def _delay(self) -> int:
        lo, hi = self.cfg.reaction_s
        return int(round(self.rng.uniform(lo, hi) * self.cfg.control_hz))

    def potential(self, ee, cube, target) -> np.ndarray:
        return pick_potential(ee, cube, target, self.geometry)

    def _phase_from_state(self, i: int, ee, cube) -> int:
        """Where the expert picks up when it takes over env i: carrying if the cube is in the hand."""
        if cube is None:
            return 0
        held = cube[i, 2] > self.geometry.cube_rest_z + 0.01 and float(np.linalg.norm(ee[i] - cube[i])) < 0.03
        return 3 if held else 0

    def step(self, ee: np.ndarray, cube: np.ndarray | None, target: np.ndarray, done: np.ndarray,
             teleoperate: bool = False) -> np.ndarray:
        """Advance every env's operator one tick; -> acting [N] bool (who holds the intervene button).
        done [N]: the task is achieved (the operator hands back / does not take over).
        teleoperate: drive every env all the time (recording demonstrations before a session)."""
        if teleoperate:
            self.state[:] = self.ACTING
            self._update_expert(ee, cube, target)
            return np.ones(self.n, bool)
        pot = self.potential(ee, cube, target)
        self.ep_step += 1
        better = pot > self.best + self.cfg.progress_m
        self.best_at = np.where(better, self.ep_step, self.best_at)
        self.best = np.where(better, pot, np.maximum(self.best, pot))
        for i in range(self.n):
            s = self.state[i]
            if s == self.IDLE:
                drifting = self.ep_step[i] > self._grace and self.ep_step[i] - self.best_at[i] > self._patience
                if drifting and not done[i]:
                    self.state[i], self.timer[i] = self.WAIT_IN, self._delay()
            elif s == self.WAIT_IN:
                self.timer[i] -= 1
                if self.timer[i] <= 0:
                    self.state[i], self.timer[i] = self.ACTING, 0
                    self.start_pot[i] = pot[i]
                    self.phase[i], self.phase_steps[i] = self._phase_from_state(i, ee, cube), 0
                    self.takeovers += 1
            elif s == self.ACTING:
                self.timer[i] += 1
                # hand back after real progress, never in the middle of a grasp (descend, close)
                steady = self.phase[i] in (0, 3)
                if (self.timer[i] >= self._min_hold and steady and pot[i] > self.start_pot[i] + self.cfg.handback_m) \
                        or done[i]:
                    self.state[i], self.timer[i] = self.WAIT_OUT, self._delay()
            elif s == self.WAIT_OUT:
                self.timer[i] -= 1
                if self.timer[i] <= 0:
                    self.state[i] = self.IDLE
                    self.best_at[i] = self.ep_step[i]  # give the policy its patience again
        self._update_expert(ee, cube, target)  # the expert's stages stay current every tick
        return self.state >= self.ACTING  # ACTING or WAIT_OUT: the button is still held

    def _update_expert(self, ee, cube, target) -> None:
        self.expert, self.phase, self.phase_steps = pick_expert(ee, cube, target, self.phase, self.phase_steps,
                                                                self.ee_scale, self.action_dim, self.cfg.gain,
                                                                self.cfg.max_stick)

    def joy(self, i: int, acting: bool) -> tuple[list[float], list[int]]:
        """Env i's gamepad this tick: (axes, buttons) as sensor_msgs/Joy carries them."""
        m = self.joy_map
        axes = [0.0] * 8
        buttons = [0] * 11
        if acting:
            a = self.expert[i] + self.rng.normal(0.0, self.cfg.noise, self.expert.shape[1]) * (
                np.arange(self.expert.shape[1]) < 3)
            for axis, ch, sc in zip(m.axes, m.channels, m.scale):
                v = float(np.clip(a[ch] / sc, -1.0, 1.0))
                # undo the deadzone rescaling so that the arbiter's output is the operator's intent
                axes[axis] = float(np.sign(v) * (m.deadzone + (1 - m.deadzone) * abs(v))) if v else 0.0
            buttons[m.intervene_button] = 1
            if self.expert.shape[1] > 3:
                grip = m.gripper_close_button if self.expert[i, 3] < 0 else m.gripper_open_button
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


class ScriptedPickOperator:
    """Corrects arm-pick (or arm-reach) policies in N simulated envs, from the task's privileged state."""

    def __init__(self, env, cfg: OperatorConfig | None = None, joy: JoyMapping | None = None):
        self.env, self.task = env, env.task
        self.pick = hasattr(self.task, "cube_pos")
        geometry = PickGeometry(self.task.cube_rest_z, self.task.cfg.lift_height) if self.pick else None
        self.core = ScriptedOperator(env.num_envs, env.action_dim, self.task.ee_scale.double().cpu().numpy(), cfg,
                                     joy, geometry)
        self.cfg, self.joy_map = self.core.cfg, self.core.joy_map

    @property
    def takeovers(self) -> int:
        return self.core.takeovers

    def _state(self):
        """(ee, cube or None, target) [N, 3] float64 numpy: what the operator sees."""
        ee = self.task.ee_pos().double().cpu().numpy()
        cube = self.task.cube_pos().double().cpu().numpy() if self.pick else None
        return ee, cube, self.task.target.double().cpu().numpy()

    def potential(self) -> np.ndarray:
        """[N] how far along the task is, in metres (higher is better): reach the cube, lift, place."""
        return self.core.potential(*self._state())

    def step(self, teleoperate: bool = False) -> np.ndarray:
        """Advance every env's operator one tick; -> acting [N] bool (who holds the intervene button).
        teleoperate: drive every env all the time (recording demonstrations before a session)."""
        return self.core.step(*self._state(), done=self.task.success().cpu().numpy(), teleoperate=teleoperate)

    def joy(self, i: int, acting: bool) -> tuple[list[float], list[int]]:
        """Env i's gamepad this tick: (axes, buttons) as sensor_msgs/Joy carries them."""
        return self.core.joy(i, acting)

    def reset(self, env_ids) -> None:
        """New episodes in env_ids: the operator lets go and waits out the grace period."""
        self.core.reset(env_ids)

"""Robot-side safety filter: the last code between the policy and the motors.

The ROS 2 node calls `SafetyFilter.filter()` once per control period
(spec.control_dt), after the policy and `ActionProcessor` have produced joint
position targets and before the joint command is published. It gets the
newest joint state (and, for floating-base robots, the IMU attitude) and
returns a `Command` of PD targets, gains and feed-forward torques that the
drives can execute as they are, whatever the policy or the sensors said
(ALGORITHMS.md, "Safety on the robot").

A small state machine decides who commands the robot:

    PASSIVE --start_ramp()--> RAMP_TO_DEFAULT --start_policy()--> POLICY
       ^                        (only once the ramp has finished)     |
       |                                                              |
       +--reset_from_damping()-- DAMPING <--estop() or a fault--------+
                                 (latched)

  PASSIVE          kp = 0, kd = kd_damp: limp but damped (start-up state).
  RAMP_TO_DEFAULT  targets interpolate from the last target (from PASSIVE: the
                   measured pose) to the default pose over cfg.ramp_time, with
                   the spec's gains.
  POLICY           the policy's targets, through the guards below.
  DAMPING          latched after estop() or a fault (watchdog, attitude,
                   bad clock): targets ramp to the measured pose while kp
                   ramps to kp_damp and kd to kd_damp over cfg.estop_ramp_time.
                   Gains never step to zero: there is no bare torque cut.

Guards, in the order filter() applies them (a `Guard` bit says which fired):
  sensor_guard    a joint state / IMU sample with NaN/Inf or implausible values
                  (beyond the range by more than a slack, faster than
                  sensor_velocity_scale x velocity_limit, a gyro reading beyond
                  imu_max_ang_vel) is ignored this step
  watchdog        no valid sample newer than sensor_timeout -> DAMPING
  attitude_guard  |roll| or |pitch| beyond the limit -> DAMPING
  estop           estop() was called
  nan_guard       NaN/Inf policy targets: hold the previous target for those joints
  position_clip   targets inside [lo + margin, hi - margin]
  rate_limit      |target - previous target| <= max_step (rad per control step)
  velocity_guard  a joint over its velocity limit gets no PD torque pushing it faster
  torque_guard    the target is moved so the predicted PD torque
                  kp (q* - q) - kd qd stays within +-torque_limit; where position
                  and rate limits leave no such target, kp and kd are scaled down
                  together so the torque equals the limit (what the drive's own
                  saturation would do); kd never goes below `kd_floor` > 0

Faults latch DAMPING from RAMP_TO_DEFAULT and POLICY. In PASSIVE the robot is
already limp and damped, so faults are only recorded (and block start_ramp()).

The gains are part of the command: a drive interface that transports only the
position targets keeps its own gains, and loses PASSIVE's zero stiffness, the
DAMPING gain ramp and the torque guard's gain scaling.

numpy only (no torch), deterministic, no growing state, and `filter()` never
raises: an unexpected internal error repeats the last command, latches DAMPING
and counts `internal_error`. Configuration errors raise in the constructor,
naming the joint.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from s2r.control.spec import RobotSpec

_BIG = 1e6  # rad: stands in for an infinite joint range (continuous joints)


def target_window(spec: RobotSpec, position_margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(lower [nj], upper [nj]) rad: where a target may lie, position_margin x range inside each bounded joint's
    limits (continuous joints: +-_BIG). The filter clips to it; the arm's IK (control/actions.py) stays in it."""
    rng = np.array([j.range for j in spec.joints], dtype=np.float64)  # [nj, 2]
    lo, hi = rng[:, 0], rng[:, 1]
    bounded = np.isfinite(lo) & np.isfinite(hi)
    margin = np.where(bounded, position_margin * np.where(bounded, hi - lo, 0.0), 0.0)
    return np.maximum(lo + margin, -_BIG), np.minimum(hi - margin, _BIG)


class Mode(enum.Enum):
    PASSIVE = "passive"
    RAMP_TO_DEFAULT = "ramp_to_default"
    POLICY = "policy"
    DAMPING = "damping"


class Guard(enum.IntFlag):
    """Which guards fired in one step (a bitmask; `Command.guards` lists the names)."""

    NONE = 0
    NAN_GUARD = 1
    POSITION_CLIP = 2
    RATE_LIMIT = 4
    VELOCITY_GUARD = 8
    TORQUE_GUARD = 16
    ATTITUDE_GUARD = 32
    WATCHDOG = 64
    ESTOP = 128
    SENSOR_GUARD = 256
    INTERNAL_ERROR = 512


_NAN_GUARD, _POSITION_CLIP, _RATE_LIMIT, _VELOCITY_GUARD, _TORQUE_GUARD = 1, 2, 4, 8, 16
_ATTITUDE_GUARD, _WATCHDOG, _ESTOP, _SENSOR_GUARD = 32, 64, 128, 256

GUARDS: tuple[Guard, ...] = (
    Guard.NAN_GUARD, Guard.POSITION_CLIP, Guard.RATE_LIMIT, Guard.VELOCITY_GUARD, Guard.TORQUE_GUARD,
    Guard.ATTITUDE_GUARD, Guard.WATCHDOG, Guard.ESTOP, Guard.SENSOR_GUARD, Guard.INTERNAL_ERROR,
)


_GUARD_BITS = tuple((int(g), g.name.lower()) for g in GUARDS)


@dataclass
class SafetyConfig:
    position_margin: float = 0.02  # fraction of each joint's range kept clear at both ends
    velocity_scale: float = 1.0  # fraction of velocity_limit: target rate limit and velocity guard
    # rad per control step; None: velocity_scale * velocity_limit * control_dt
    max_target_step: float | list[float] | None = None
    max_roll: float = 0.8  # rad; beyond it -> DAMPING (robots with an IMU)
    max_pitch: float = 0.8  # rad
    check_attitude: bool | None = None  # None: check when the spec names an imu_site (floating base)
    sensor_timeout: float | None = None  # s without a valid joint state -> DAMPING; None: 2 control periods (the ROS node passes its own: 3 by default)
    ramp_time: float = 2.0  # s, RAMP_TO_DEFAULT from the measured pose to the default pose
    estop_ramp_time: float = 0.5  # s, DAMPING ramp of targets and gains
    kp_damp: float | list[float] = 0.0  # N m / rad, stiffness at the end of the DAMPING ramp
    kd_damp: float | list[float] | None = None  # N m s / rad in PASSIVE/DAMPING, > 0; None: the spec's kd
    still_velocity: float = 0.1  # rad/s: reset_from_damping() needs every |qd| below this
    sensor_position_slack: float = 0.5  # rad beyond the joint range before a reading is implausible
    sensor_velocity_scale: float = 4.0  # |qd| beyond this x velocity_limit is implausible (no limit: 1000 rad/s)
    # torque_guard and velocity_guard act on the target (see the module docstring). They place the target for
    # the PD torque at the start of the control period; with large damping gains against small torque limits
    # (the Panda's wrist servos: kd 200 N m s/rad, 12 N m) the damping then eats that torque within the period
    # and the joint crawls (0.2 rad/s measured where the saturating drive reaches its limit). A drive that
    # saturates on its own, as the simulator's actuators do, needs neither: set False for such robots.
    torque_guard: bool = True
    imu_max_ang_vel: float = 35.0  # rad/s per axis: a gyro reading beyond it is implausible (2000 deg/s range)


@dataclass
class Command:
    """One joint command for the drives: tau = kp (q_target - q) - kd qd + tau_ff."""

    q_target: np.ndarray  # [nj] rad, PD position targets
    kp: np.ndarray  # [nj] N m / rad
    kd: np.ndarray  # [nj] N m s / rad
    tau_ff: np.ndarray  # [nj] N m, feed-forward torque (zeros)
    interventions: Guard  # guards that fired this step
    mode: Mode  # the filter's mode after this step

    @property
    def guards(self) -> list[str]:
        bits = int(self.interventions)
        return [name for bit, name in _GUARD_BITS if bit & bits] if bits else []


@dataclass(frozen=True)
class Transition:
    """Result of a mode request; falsy when refused, `reason` says why."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


class SafetyFilter:
    def __init__(self, spec: RobotSpec, cfg: SafetyConfig | None = None):
        cfg = cfg if cfg is not None else SafetyConfig()
        self.spec, self.cfg = spec, cfg
        nj = spec.num_joints
        names = spec.joint_names
        where = f"safety filter for robot spec '{spec.name}'"
        if spec.action.type == "joint_torque":
            raise ValueError(f"{where}: the filter shapes PD position targets, but the spec's "
                             f"action type is joint_torque")
        for field_name in ("position_margin", "velocity_scale", "max_roll", "max_pitch", "ramp_time",
                           "estop_ramp_time", "still_velocity", "sensor_position_slack",
                           "sensor_velocity_scale"):
            v = getattr(cfg, field_name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{where}: SafetyConfig.{field_name} must be finite and >= 0, got {v}")
        if not cfg.position_margin < 0.5:
            raise ValueError(f"{where}: SafetyConfig.position_margin must be < 0.5, got {cfg.position_margin}")
        for field_name in ("ramp_time", "estop_ramp_time", "velocity_scale", "sensor_velocity_scale"):
            if not getattr(cfg, field_name) > 0:
                raise ValueError(f"{where}: SafetyConfig.{field_name} must be > 0")

        def per_joint(value, what: str) -> np.ndarray:
            a = np.asarray(value, dtype=np.float64)
            a = np.broadcast_to(a, (nj,)).copy() if a.ndim == 0 else a
            if a.shape != (nj,):
                raise ValueError(f"{where}: {what} has {a.size} entries, expected 1 or {nj}")
            return a

        def check(a: np.ndarray, what: str, positive: bool = False, finite: bool = True) -> None:
            for i, v in enumerate(a):
                if math.isnan(v) or v < 0 or (positive and v == 0) or (finite and math.isinf(v)):
                    need = "> 0" if positive else ">= 0"
                    raise ValueError(f"{where}: joint '{names[i]}' {what} must be finite and {need}, got {v}")

        dt = spec.control_dt
        rng = np.array([j.range for j in spec.joints], dtype=np.float64)  # [nj, 2]
        lo, hi = rng[:, 0], rng[:, 1]
        self.lower, self.upper = target_window(spec, cfg.position_margin)  # [nj] rad, target limits
        self._q_lo = np.maximum(lo - cfg.sensor_position_slack, -_BIG)  # plausible readings
        self._q_hi = np.minimum(hi + cfg.sensor_position_slack, _BIG)
        self.default = np.clip(np.array(spec.array("default"), dtype=np.float64), self.lower, self.upper)

        self.kp = np.array(spec.array("kp"), dtype=np.float64)
        self.kd = np.array(spec.array("kd"), dtype=np.float64)
        check(self.kp, "kp")
        check(self.kd, "kd")
        vlim = np.array(spec.array("velocity_limit"), dtype=np.float64)
        self.velocity_limit = cfg.velocity_scale * vlim  # [nj] rad/s, velocity guard (may be inf)
        if cfg.max_target_step is None:
            self.max_step = self.velocity_limit * dt
            for i, v in enumerate(self.max_step):
                if not (math.isfinite(v) and v > 0):
                    raise ValueError(f"{where}: joint '{names[i]}' has velocity_limit {vlim[i]}; "
                                     f"set it in the spec or set SafetyConfig.max_target_step")
        else:
            self.max_step = per_joint(cfg.max_target_step, "SafetyConfig.max_target_step")
            check(self.max_step, "max_target_step", positive=True)
        self.torque_limit = np.array(spec.array("torque_limit"), dtype=np.float64)  # inf: unguarded
        check(self.torque_limit, "torque_limit", positive=True, finite=False)
        self._qd_max = np.where(np.isfinite(vlim), cfg.sensor_velocity_scale * vlim, 1e3)
        self.kp_damp = per_joint(cfg.kp_damp, "SafetyConfig.kp_damp")
        check(self.kp_damp, "kp_damp")
        self.kd_damp = self.kd.copy() if cfg.kd_damp is None else per_joint(cfg.kd_damp, "SafetyConfig.kd_damp")
        for i, v in enumerate(self.kd_damp):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{where}: joint '{names[i]}' damping gain kd_damp is {v}; it must be "
                                 f"> 0 (the spec's kd is used unless SafetyConfig.kd_damp is set)")
        self.timeout = 2.0 * dt if cfg.sensor_timeout is None else float(cfg.sensor_timeout)
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"{where}: SafetyConfig.sensor_timeout must be > 0, got {self.timeout}")
        # Lowest kd the torque guard can leave (it scales gains only on plausible readings):
        # |kp (q* - q) - kd qd| <= kp_max (range + 2 slack) + kd_max qd_max before scaling.
        kp_max, kd_max = np.maximum(self.kp, self.kp_damp), np.maximum(self.kd, self.kd_damp)
        worst = kp_max * (self._q_hi - self._q_lo) + kd_max * self._qd_max
        # [nj] N m s / rad
        self.kd_floor = np.minimum(self.kd, self.kd_damp) * np.minimum(1.0, self.torque_limit / worst)
        self.check_attitude = (spec.imu_site is not None) if cfg.check_attitude is None else cfg.check_attitude
        self.dt = dt
        self._names = names
        self._zeros = np.zeros(nj)
        self._ones = np.ones(nj)
        self._plus_inf = np.full(nj, np.inf)
        self._minus_inf = -self._plus_inf

        # ---- state --------------------------------------------------------------------
        self._mode = Mode.PASSIVE
        self._reason = "start-up"
        self._target = self.default.copy()  # previous output target [nj]
        self._kp_nom = np.zeros(nj)  # previous nominal gains (before torque scaling) [nj]
        self._kd_nom = self.kd_damp.copy()
        self._q = np.zeros(nj)  # newest plausible joint state [nj]
        self._qd = np.zeros(nj)
        self._have_q = False
        self._qt = np.zeros(nj)  # read buffers [nj]
        self._qin = np.zeros(nj)
        self._qdin = np.zeros(nj)
        self._last_good_stamp = -math.inf
        self._t_prev = -math.inf
        self._stale = True  # as of the last filter() call
        self._tilted = False  # attitude beyond the limit at the last call
        self._roll = self._pitch = 0.0  # rad, the last valid attitude
        self._ramp_t0: float | None = None
        self._ramp_start = self.default.copy()
        self._ramp_done = False
        self._damp_t0: float | None = None
        self._damp_target0 = self.default.copy()
        self._damp_kp0 = np.zeros(nj)
        self._damp_kd0 = self.kd_damp.copy()
        self._damp_done = False
        self._estop_pending = False
        self.counters: dict[str, int] = {g.name.lower(): 0 for g in GUARDS}  # steps each guard fired
        self._last = Command(self._target.copy(), self._kp_nom.copy(), self._kd_nom.copy(),
                             self._zeros.copy(), Guard.NONE, self._mode)

    # ---- state machine ----------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def reason(self) -> str:
        """Why the filter is in its current mode (for DAMPING: the first fault or the e-stop)."""
        return self._reason

    @property
    def last_command(self) -> Command:
        return self._last

    def start_ramp(self) -> Transition:
        """PASSIVE or POLICY -> RAMP_TO_DEFAULT; the ramp starts at the next filter() call.

        From PASSIVE it is allowed once the (rate-limited) target has caught up with the
        measured pose, so that the ramp starts exactly there.
        """
        if self._mode is Mode.DAMPING:
            return Transition(False, f"latched in DAMPING ({self._reason}); call reset_from_damping() first")
        if self._mode is Mode.RAMP_TO_DEFAULT:
            return Transition(True, "already ramping to the default pose")
        if not self._have_q or self._stale:
            return Transition(False, "no fresh joint state: the ramp starts from the measured pose")
        if self._tilted:
            return Transition(False, f"attitude beyond the limit ({self._tilt_text()})")
        if self._mode is Mode.PASSIVE:
            gap = np.abs(self._target - np.clip(self._q, self.lower, self.upper))
            j = int(np.argmax(gap))
            if gap[j] > 1e-9:
                return Transition(False, f"the target is still catching up with the measured pose "
                                         f"(joint '{self._names[j]}' {gap[j]:.3f} rad behind); try again")
        self._set_mode(Mode.RAMP_TO_DEFAULT, "start_ramp()")
        self._ramp_t0, self._ramp_done = None, False
        return Transition(True, "ramping to the default pose")

    def start_policy(self) -> Transition:
        """RAMP_TO_DEFAULT (finished) -> POLICY."""
        if self._mode is Mode.POLICY:
            return Transition(True, "already in POLICY")
        if self._mode is not Mode.RAMP_TO_DEFAULT:
            return Transition(False, f"start_policy() needs a finished RAMP_TO_DEFAULT, mode is "
                                     f"{self._mode.name}; call start_ramp() first")
        if not self._ramp_done:
            if self._ramp_t0 is None:
                return Transition(False, "ramp to default not finished: it has not started yet")
            left = max(self._ramp_t0 + self.cfg.ramp_time - self._t_prev, 0.0)
            err = np.abs(self._target - self.default)
            j = int(np.argmax(err))
            return Transition(False, f"ramp to default not finished: {left:.3f} s left, joint "
                                     f"'{self._names[j]}' {err[j]:.3f} rad from its default")
        self._set_mode(Mode.POLICY, "start_policy()")
        return Transition(True, "policy in command")

    def estop(self) -> Transition:
        """Latch DAMPING from any mode."""
        self._estop_pending = True
        self._enter_damping("e-stop")
        return Transition(True, "DAMPING latched by e-stop")

    def reset_from_damping(self) -> Transition:
        """DAMPING -> PASSIVE, only once the damping ramp is over and the robot is still."""
        if self._mode is not Mode.DAMPING:
            return Transition(False, f"not in DAMPING (mode is {self._mode.name})")
        if not self._damp_done:
            return Transition(False, "the damping ramp is still running")
        if self._stale or not self._have_q:
            return Transition(False, "no fresh joint state: cannot tell that the robot is still")
        speed = np.abs(self._qd)
        j = int(np.argmax(speed))
        if speed[j] > self.cfg.still_velocity:
            return Transition(False, f"robot not still: joint '{self._names[j]}' moves at {speed[j]:.3f} "
                                     f"rad/s (must be below {self.cfg.still_velocity})")
        self._set_mode(Mode.PASSIVE, "reset_from_damping()")
        return Transition(True, "PASSIVE")

    def _tilt_text(self) -> str:
        return (f"roll {self._roll:.3f} rad, pitch {self._pitch:.3f} rad; limits "
                f"{self.cfg.max_roll}, {self.cfg.max_pitch}")

    def _set_mode(self, mode: Mode, reason: str) -> None:
        self._mode, self._reason = mode, reason

    def _enter_damping(self, reason: str) -> None:
        if self._mode is Mode.DAMPING:
            return  # latched: keep the first reason and the running ramp
        self._set_mode(Mode.DAMPING, reason)
        self._damp_t0, self._damp_done = None, False

    # ---- the filter -------------------------------------------------------------------
    def filter(self, t: float, q_target, q, qd, *, last_sensor_time: float,
               projected_gravity=None, rpy=None, ang_vel=None) -> Command:
        """One control step.

        t: the node's monotonic clock (s). q_target [nj]: the policy's joint targets
        (ignored outside POLICY). q, qd [nj]: newest joint state, stamped
        last_sensor_time (same clock as t). projected_gravity [3] (unit gravity in the
        base frame, (0, 0, -1) upright) or rpy [3] (rad): the IMU attitude, needed when
        attitude checking is on; ang_vel [3] (rad/s, optional): the gyro, checked for
        plausibility with the attitude. Never raises.
        """
        try:
            return self._step(t, q_target, q, qd, last_sensor_time, projected_gravity, rpy, ang_vel)
        except Exception as e:  # noqa: BLE001 - the last line of defence on the robot
            self._enter_damping(f"internal error in the safety filter: {e!r}")
            self.counters["internal_error"] += 1
            last = self._last
            self._last = Command(last.q_target.copy(), last.kp.copy(), last.kd.copy(), self._zeros.copy(),
                                 Guard.INTERNAL_ERROR, self._mode)
            return self._last

    def _step(self, t, q_target, q, qd, last_sensor_time, projected_gravity, rpy, ang_vel) -> Command:
        fired = 0  # a plain int inside the step: IntFlag arithmetic costs ~1 us per operation
        # -- clock: never runs backwards; a non-finite clock makes every sample stale
        t = _as_float(t)
        clock_ok = math.isfinite(t)
        if not clock_ok:
            t = self._t_prev + self.dt if math.isfinite(self._t_prev) else 0.0
        elif math.isfinite(self._t_prev):
            t = max(t, self._t_prev)
        self._t_prev = t

        # -- sensors: a sample is used only when every value is finite and plausible
        q_ok = _read(q, self._qin)
        qd_ok = _read(qd, self._qdin)
        q_ok = q_ok and not (_nz(self._qin < self._q_lo) or _nz(self._qin > self._q_hi))
        qd_ok = qd_ok and not _nz(_abs(self._qdin) > self._qd_max)
        roll, pitch = _roll_pitch(projected_gravity, rpy) if self.check_attitude else (0.0, 0.0)
        att_ok = math.isfinite(roll) and math.isfinite(pitch)
        if ang_vel is not None and self.check_attitude:
            try:
                w = [abs(_as_float(v)) for v in ang_vel]
                att_ok = att_ok and len(w) == 3 and all(x <= self.cfg.imu_max_ang_vel for x in w)
            except TypeError:
                att_ok = False
        sample_ok = q_ok and qd_ok and att_ok
        if q_ok and qd_ok:
            self._q[:] = self._qin
            self._qd[:] = self._qdin
            self._have_q = True
        else:
            fired |= _SENSOR_GUARD
        if self.check_attitude and not att_ok:
            fired |= _SENSOR_GUARD
        stamp = _as_float(last_sensor_time)
        if sample_ok and clock_ok and math.isfinite(stamp) and stamp <= t + self.timeout:
            self._last_good_stamp = max(self._last_good_stamp, min(stamp, t))
        age = t - self._last_good_stamp
        self._stale = not clock_ok or age > self.timeout + 1e-9
        if self._stale:
            fired |= _WATCHDOG
        if att_ok:
            self._roll, self._pitch = roll, pitch
        self._tilted = att_ok and (abs(roll) > self.cfg.max_roll or abs(pitch) > self.cfg.max_pitch)
        if self._tilted:
            fired |= _ATTITUDE_GUARD
        self._have_fast = self._have_q and _nz(_abs(self._qd) > self.velocity_limit) > 0
        if self._have_fast:
            fired |= _VELOCITY_GUARD

        # -- faults latch DAMPING from the active modes
        if self._mode in (Mode.RAMP_TO_DEFAULT, Mode.POLICY):
            if self._stale:
                self._enter_damping("watchdog: non-finite clock" if not clock_ok else
                                    f"watchdog: no valid joint state for {age:.3f} s "
                                    f"(timeout {self.timeout:.3f} s)")
            elif self._tilted:
                self._enter_damping(f"attitude: {self._tilt_text()}")
        if self._estop_pending:
            fired |= _ESTOP
            self._estop_pending = False

        # -- what the mode asks for: candidate target and nominal gains [nj]
        prev = self._target
        measured = self._q if self._have_q else prev
        mode = self._mode
        if mode is Mode.PASSIVE:
            cand, kp, kd = measured, self._zeros, self.kd_damp
        elif mode is Mode.RAMP_TO_DEFAULT:
            if self._ramp_t0 is None:  # start from the last target: the measured pose when
                self._ramp_t0 = t  # coming from PASSIVE, bumpless when coming from POLICY
                self._ramp_start[:] = prev
            s = min((t - self._ramp_t0) / self.cfg.ramp_time, 1.0)
            cand = self._ramp_start + s * (self.default - self._ramp_start)
            kp, kd = self.kp, self.kd
        elif mode is Mode.POLICY:
            _read(q_target, self._qt)
            bad = ~np.isfinite(self._qt)
            if _nz(bad):
                fired |= _NAN_GUARD
                self._qt[bad] = prev[bad]
            cand, kp, kd = self._qt, self.kp, self.kd
        else:  # DAMPING
            if self._damp_t0 is None:
                self._damp_t0 = t
                self._damp_target0[:] = prev
                self._damp_kp0[:] = self._kp_nom
                self._damp_kd0[:] = self._kd_nom
            s = min((t - self._damp_t0) / self.cfg.estop_ramp_time, 1.0)
            self._damp_done = s >= 1.0
            cand = self._damp_target0 + s * (measured - self._damp_target0)
            kp = self._damp_kp0 + s * (self.kp_damp - self._damp_kp0)
            kd = self._damp_kd0 + s * (self.kd_damp - self._damp_kd0)

        # -- hard limits: position window P, then rate window W = P & [prev - r, prev + r]
        target = _min(_max(cand, self.lower), self.upper)
        if _nz(target != cand):
            fired |= _POSITION_CLIP
        w_lo = _max(self.lower, prev - self.max_step)
        w_hi = _min(self.upper, prev + self.max_step)
        limited = _min(_max(target, w_lo), w_hi)
        if _nz(limited != target):
            fired |= _RATE_LIMIT
        target = limited

        # -- torque and velocity guards on the newest plausible joint state
        kp_out, kd_out = kp, kd
        fits = True
        if self._have_q and self.cfg.torque_guard:
            q_m, qd_m, lim = self._q, self._qd, self.torque_limit
            # fast path: target inside the torque window T (|PD torque| <= limit) and no joint over its
            # velocity limit -> the guard would leave target and gains as they are
            fits = not self._have_fast and not _nz(_abs(kp * (target - q_m) - kd * qd_m) > lim)
        if self._have_q and not fits:
            stiff = kp > 0
            kp_safe = np.where(stiff, kp, self._ones)
            centre = q_m + kd * qd_m / kp_safe  # target with zero PD torque
            half = lim / kp_safe
            t_lo = np.where(stiff, centre - half, self._minus_inf)  # torque window T
            t_hi = np.where(stiff, centre + half, self._plus_inf)
            if self._have_fast:  # over the velocity limit: no torque in the direction of motion
                t_hi = np.where(stiff & (qd_m > self.velocity_limit), _min(t_hi, centre), t_hi)
                t_lo = np.where(stiff & (qd_m < -self.velocity_limit), _max(t_lo, centre), t_lo)
            lo, hi = _max(w_lo, t_lo), _min(w_hi, t_hi)
            if not _nz(lo > hi):  # W & T not empty everywhere: the common case
                guarded = _min(_max(target, lo), hi)
            else:  # where empty: the nearest point of W to T
                guarded = np.where(lo <= hi, _min(_max(target, lo), hi),
                                   _min(_max(_min(_max(target, t_lo), t_hi), w_lo), w_hi))
            tau = kp * (guarded - q_m) - kd * qd_m
            over = _abs(tau) > lim
            if _nz(over):  # no target helps: saturate by scaling both gains, as the drive would
                scale = np.where(over, lim / np.where(over, _abs(tau), 1.0), 1.0)
                kp_out, kd_out = kp * scale, kd * scale
                fired |= _TORQUE_GUARD
            elif _nz(guarded != target):
                fired |= _TORQUE_GUARD
            target = guarded

        if mode is Mode.RAMP_TO_DEFAULT and self._ramp_t0 is not None:
            self._ramp_done = (t - self._ramp_t0 >= self.cfg.ramp_time
                               and bool(np.all(np.abs(target - self.default) <= 1e-9)))

        # -- commit
        self._target[:] = target
        self._kp_nom[:] = kp
        self._kd_nom[:] = kd
        if fired:
            # before the first joint state, in PASSIVE, a missing sample is a robot not yet up, not a fault: the
            # guards still fire (the command says so) but are not counted as interventions
            waiting = mode is Mode.PASSIVE and not self._have_q
            for bit, name in _GUARD_BITS:
                if bit & fired and not (waiting and bit & (_WATCHDOG | _SENSOR_GUARD)):
                    self.counters[name] += 1
        self._last = Command(target.copy(), np.array(kp_out, dtype=np.float64),
                             np.array(kd_out, dtype=np.float64), self._zeros.copy(), Guard(fired), self._mode)
        return self._last


# ---- helpers ----------------------------------------------------------------------

# ufuncs and C functions: no Python wrapper per call (np.clip, ndarray.any have one; ~1 us each on 13 joints)
_min, _max, _abs, _nz = np.minimum, np.maximum, np.absolute, np.count_nonzero


def _as_float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _read(x, out: np.ndarray) -> bool:
    """Copy x into out ([nj]); NaN-fill when x is None or misshaped. True when every value is finite."""
    if x is None:
        out.fill(math.nan)
        return False
    try:
        if getattr(x, "shape", None) == out.shape:
            out[:] = x  # the common case: an array of the right shape
        else:
            a = np.asarray(x, dtype=np.float64)
            if a.size != out.size:
                out.fill(math.nan)
                return False
            out[:] = a.reshape(-1)
    except (TypeError, ValueError, OverflowError):
        out.fill(math.nan)
        return False
    return _nz(np.isfinite(out)) == out.size


def _roll_pitch(projected_gravity, rpy) -> tuple[float, float]:
    """Roll and pitch (rad) from rpy, else from the projected gravity; NaN when unusable.

    Projected gravity g = R^T (0, 0, -1) = (sin p, -cos p sin r, -cos p cos r) for
    R = Rz(yaw) Ry(p) Rx(r), so r = atan2(-g_y, -g_z), p = atan2(g_x, hypot(g_y, g_z)).
    """
    try:
        if rpy is not None:
            r, p = _as_float(rpy[0]), _as_float(rpy[1])
            if not (math.isfinite(r) and math.isfinite(p)):
                return math.nan, math.nan
            return math.atan2(math.sin(r), math.cos(r)), math.atan2(math.sin(p), math.cos(p))
        if projected_gravity is None or len(projected_gravity) != 3:
            return math.nan, math.nan
        gx, gy, gz = (_as_float(v) for v in projected_gravity)
    except (TypeError, IndexError, KeyError):
        return math.nan, math.nan
    if not (math.isfinite(gx) and math.isfinite(gy) and math.isfinite(gz)) or gx == gy == gz == 0.0:
        return math.nan, math.nan
    return math.atan2(-gy, -gz), math.atan2(gx, math.hypot(gy, gz))

"""Operator input and arbitration: who commands the robot this tick, the policy or a person.

An operator watches the robot and takes over when the policy errs (HIL-SERL's interventions,
../shared/ALGORITHMS.md). Their devices arrive here as plain numbers; the ROS policy node
(s2r/ros/policy_node.py) feeds sensor_msgs/Joy and geometry_msgs/Twist into it, a simulation
bench feeds a scripted operator through `update()`, and both get the same decision:

    device input (Joy axes/buttons, Twist linear, any action) --validate--> newest state per device
                                                                             |
    policy action [a] in [-1, 1] --> Arbiter.step(policy_action, t) <--------+
                                       --> (executed action [a], source, intervened)
                                       --> action mode (control/actions.py) --> safety filter

Arbitration happens in policy-action space ([-1, 1] per channel), BEFORE control/actions.py turns
the action into joint targets, so the operator's action takes the normal path (action mode, then
the safety filter) and is what a recording stores as the executed action.

Who acts (one decision per control tick):
  - A device is *active* while its hold-to-intervene button is held, or while its input is beyond
    the deadzone on some channel (stick or spacemouse moved; a gripper button held or pressed since
    the last tick). An active operator replaces the policy.
  - Full takeover (per_axis=False, the default): every channel an active device maps takes the
    operator's value (0 where that axis rests in its deadzone: the operator holds the arm still).
    Per axis (per_axis=True): only the channels the operator moves beyond the deadzone are replaced;
    the policy keeps the others. A held intervene button is a full takeover in both modes.
  - Channels that no device maps always keep the policy's action (e.g. most joints of a humanoid
    whose gamepad maps three axes).
  - Gripper (ee_delta specs with a gripper: channel 3, -1 closed .. +1 open): while the operator
    acts it holds the value it had when the intervention began; the gripper buttons set it to open
    (+1) or closed (-1). It returns to the policy when the intervention ends (so a quick press acts
    for at least one tick; hold the intervene button to keep a gripper closed).
  - Several active devices: each channel comes from the first device, in the order joy, twist,
    then other sources in the order they first reported, that moved it; held-still channels of a
    holding device come after moved channels of any other (so the keyboard teleop's Joy `hold`
    with its Twist motion combine). `source` names the first device that moved a channel, else
    the first that holds.
  - Silence: a device whose newest input is older than `timeout` (default 0.25 s) counts as
    released: a device that goes silent never holds the robot under stale input. Its state change
    (first input, silent, back) is a notice the caller drains and logs once.

Bad input never raises: NaN/Inf values, or Joy messages with fewer axes/buttons than the mapping
reads, are rejected and counted per device (`rejected`, `last_reject_reason`); the caller shows the
counts in its diagnostics. A device flooding at 1 kHz costs a few microseconds per message: only
the newest values are kept (no queue), while button presses between two ticks are still seen.

Labels: a rising edge of the success/failure button is an episode label (`Label`), queued for the
caller to drain (`drain_labels()`); the policy node ends the episode with it.

numpy only (no torch, no rclpy): it runs on the robot and in simulation benches. Not thread-safe:
call it from one thread (the ROS node's executor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from s2r.control.spec import RobotSpec

POLICY = "policy"  # the source when no operator acts
JOY, TWIST = "joy", "twist"  # the two device kinds the node subscribes to
DEVICE_NONE, DEVICE_LIVE, DEVICE_SILENT = "none", "live", "silent"  # a device's status


@dataclass
class JoyMapping:
    """sensor_msgs/Joy -> policy action. Defaults: an Xbox-layout gamepad through the ROS `joy` driver
    (axes 0/1 left stick x/y, 3/4 right stick x/y, +1 = left/up; buttons A 0, B 1, X 2, Y 3, LB 4),
    driving an arm's end effector in its base frame: left stick up = +x (forward), left = +y,
    right stick up = +z."""

    axes: tuple[int, ...] = (1, 0, 4)  # Joy axis index per mapped channel
    channels: tuple[int, ...] = (0, 1, 2)  # the action channel each of those axes drives
    scale: tuple[float, ...] = (1.0, 1.0, 1.0)  # action units per full deflection; the sign flips direction
    deadzone: float = 0.1  # |axis| at or below it reads 0; beyond, rescaled so the output starts at 0
    intervene_button: int = 4  # hold to take over (LB); -1: none
    success_button: int = 0  # press: label the episode a success (A); -1: none
    failure_button: int = 1  # press: label the episode a failure (B); -1: none
    gripper_open_button: int = 2  # press/hold: gripper open while the operator acts (X); -1: none
    gripper_close_button: int = 3  # press/hold: gripper closed (Y); -1: none

    def buttons(self) -> dict[str, int]:
        return {"intervene": self.intervene_button, "success": self.success_button,
                "failure": self.failure_button, "gripper_open": self.gripper_open_button,
                "gripper_close": self.gripper_close_button}


@dataclass
class TwistMapping:
    """geometry_msgs/Twist (a spacemouse driver's, or the keyboard teleop's) -> end-effector deltas.

    linear x, y, z drive `channels` (an ee_delta spec's end-effector step, base frame) as
    clip(scale * linear, -1, 1). angular is ignored: the ee_delta action has no orientation channel
    (the IK holds the end effector's orientation); non-finite angular values still reject a message."""

    channels: tuple[int, int, int] = (0, 1, 2)  # action channels of linear x, y, z
    scale: float = 1.0  # action units per twist unit
    deadband: float = 0.05  # twist units, per component: |linear_i| at or below it reads 0


@dataclass
class ArbiterConfig:
    action_dim: int  # a: the policy's action size
    joy: JoyMapping | None = field(default_factory=JoyMapping)  # None: no Joy input
    twist: TwistMapping | None = field(default_factory=TwistMapping)  # None: no Twist input
    timeout: float = 0.25  # s: an input older than this counts as released
    per_axis: bool = False  # True: replace only the channels the operator moves
    gripper_channel: int | None = None  # the action's gripper channel (ee_delta with a gripper: 3)

    @classmethod
    def for_spec(cls, spec: RobotSpec, **kwargs) -> ArbiterConfig:
        """action_dim and gripper channel from a robot spec; Twist only where the action has end-effector
        channels (ee_delta). kwargs: the other fields."""
        ee = spec.action.type == "ee_delta"
        kwargs.setdefault("gripper_channel", 3 if ee and spec.action.gripper is not None else None)
        if not ee:
            kwargs["twist"] = None
        return cls(action_dim=spec.action_dim, **kwargs)


@dataclass(frozen=True)
class Label:
    """An operator's episode label: success or failure, from which device or service, when."""

    success: bool
    source: str
    t: float


class _Device:
    """One input device's newest state, as the arbiter knows it."""

    def __init__(self, name: str, channels, action_dim: int):
        self.name = name
        self.channels = np.asarray(channels, dtype=np.intp)  # [k] action channels it maps
        self.values = np.zeros(action_dim)  # [a] its action (meaningful on `channels`)
        self.moved = np.zeros(action_dim, dtype=bool)  # [a] channels beyond the deadzone
        self.any_moved = False  # some mapped axis beyond its deadzone
        self.hold = False  # the hold-to-intervene button is held
        self.grip = False  # a gripper button is held
        self.pending = False  # a gripper button was pressed since the last step (acts for one tick at least)
        self.raw: tuple = ()  # newest raw axis values, mapped in step() (a flood costs no mapping)
        self.dirty = False  # raw changed since the last mapping
        self.stamp = -math.inf  # time of the newest accepted input
        self.received = 0  # accepted inputs
        self.status = DEVICE_NONE


class Arbiter:
    """Operator-or-policy arbitration for one robot; see the module docstring for the rules."""

    def __init__(self, cfg: ArbiterConfig):
        self.cfg = cfg
        a = int(cfg.action_dim)
        if a < 1:
            raise ValueError(f"ArbiterConfig.action_dim must be >= 1, got {cfg.action_dim}")
        if not (math.isfinite(cfg.timeout) and cfg.timeout > 0):
            raise ValueError(f"operator timeout must be finite and > 0 s, got {cfg.timeout}")
        gc = cfg.gripper_channel
        if gc is not None and not 0 <= gc < a:
            raise ValueError(f"gripper channel {gc} is not a channel of the {a}-dimensional action")
        self._devices: list[_Device] = []
        self._by_name: dict[str, _Device] = {}
        if cfg.joy is not None:
            m = cfg.joy
            if not (len(m.axes) == len(m.channels) == len(m.scale)):
                raise ValueError(f"joy mapping: axes {list(m.axes)}, channels {list(m.channels)} and scale "
                                 f"{list(m.scale)} must have one entry each per mapped axis")
            self._check_channels("joy mapping", m.channels)
            if any(i < 0 for i in m.axes):
                raise ValueError(f"joy mapping: axis indices must be >= 0, got {list(m.axes)}")
            if not all(math.isfinite(s) for s in m.scale):
                raise ValueError(f"joy mapping: scale must be finite, got {list(m.scale)}")
            if not (math.isfinite(m.deadzone) and 0.0 <= m.deadzone < 1.0):
                raise ValueError(f"joy deadzone must be in [0, 1), got {m.deadzone}")
            used = {k: b for k, b in m.buttons().items() if b >= 0}
            if len(set(used.values())) != len(used):
                raise ValueError(f"joy buttons: each role needs its own button, got {used}")
            self._joy_need_axes = max(m.axes, default=-1) + 1  # a message must carry at least these
            self._joy_need_buttons = max(used.values(), default=-1) + 1
            self._joy_scale = tuple(float(s) for s in m.scale)
            self._joy_channels = tuple(int(c) for c in m.channels)
            self._joy_buttons = used  # role -> button index, for the roles in use
            self._joy_prev = {k: False for k in used}  # role -> pressed in the previous message
            self._add(_Device(JOY, m.channels, a))
        if cfg.twist is not None:
            t = cfg.twist
            if len(t.channels) != 3:
                raise ValueError(f"twist mapping: channels must name 3 action channels (linear x, y, z), "
                                 f"got {list(t.channels)}")
            self._check_channels("twist mapping", t.channels)
            if not (math.isfinite(t.scale) and math.isfinite(t.deadband) and t.deadband >= 0):
                raise ValueError(f"twist mapping: scale must be finite and deadband >= 0, got {t.scale}, "
                                 f"{t.deadband}")
            self._add(_Device(TWIST, t.channels, a))
        self._out = np.zeros(a)  # [a] the executed action while an operator acts (reused)
        self._gripper = 0.0  # the operator's gripper command during an intervention
        self._gripper_set = False  # a gripper button set it in this intervention
        self.intervening = False
        self.source, self.intervened = POLICY, False  # the newest step's decision
        self.steps = 0  # step() calls
        self.intervened_steps = 0  # of which the operator acted
        self.interventions = 0  # interventions begun (policy -> operator transitions)
        self.rejected: dict[str, int] = {d.name: 0 for d in self._devices}  # per device
        self.last_reject_reason = ""
        self._labels: list[Label] = []
        self._notices: list[str] = []

    def _check_channels(self, what: str, channels) -> None:
        a, gc = self.cfg.action_dim, self.cfg.gripper_channel
        bad = [c for c in channels if not 0 <= c < a]
        if bad:
            raise ValueError(f"{what}: channels {bad} are not channels of the {a}-dimensional action")
        if len(set(channels)) != len(channels):
            raise ValueError(f"{what}: a channel is mapped twice in {list(channels)}")
        if gc is not None and gc in channels:
            raise ValueError(f"{what}: channel {gc} is the gripper channel (set by the gripper buttons)")

    def _add(self, d: _Device) -> _Device:
        self._devices.append(d)
        self._by_name[d.name] = d
        return d

    # ---- inputs ----------------------------------------------------------------------------------
    def update_joy(self, axes, buttons, t: float) -> bool:
        """A sensor_msgs/Joy sample (axes [float], buttons [int]) that arrived at t (s, the step clock).
        False (and counted) when rejected."""
        m = self.cfg.joy
        if m is None:
            return self._reject(JOY, "Joy input is not configured")
        if len(axes) < self._joy_need_axes or len(buttons) < self._joy_need_buttons:
            return self._reject(JOY, f"Joy message has {len(axes)} axes and {len(buttons)} buttons; the mapping "
                                     f"reads axes {list(m.axes)} and buttons {self._joy_buttons} (check the "
                                     f"joy axis map and button indices against your gamepad)")
        for v in axes:
            if not math.isfinite(v):
                return self._reject(JOY, f"Joy axes have non-finite values {list(axes)}")
        d = self._by_name[JOY]
        d.raw = tuple(float(axes[i]) for i in m.axes)
        pressed = {k: buttons[b] > 0 for k, b in self._joy_buttons.items()}
        prev = self._joy_prev
        for k in ("success", "failure"):
            if pressed.get(k) and not prev[k]:
                self._labels.append(Label(k == "success", JOY, t))
        grip = False
        if self.cfg.gripper_channel is not None:
            for k, value in (("gripper_open", 1.0), ("gripper_close", -1.0)):
                if pressed.get(k):
                    grip = True
                    if not prev[k]:  # a press sets the gripper (and counts for the next tick, however short)
                        self._gripper, self._gripper_set, d.pending = value, True, True
        d.grip = grip
        d.hold = bool(pressed.get("intervene"))
        self._joy_prev = pressed
        return self._accept(d, t)

    def update_twist(self, linear, angular, t: float) -> bool:
        """A geometry_msgs/Twist sample (linear [3], angular [3]; angular ignored) that arrived at t."""
        if self.cfg.twist is None:
            return self._reject(TWIST, "Twist input is not configured (an ee_delta action is needed)")
        if len(linear) != 3 or len(angular) != 3:
            return self._reject(TWIST, f"Twist needs 3 linear and 3 angular values, got {len(linear)} and "
                                       f"{len(angular)}")
        for v in (*linear, *angular):
            if not math.isfinite(v):
                return self._reject(TWIST, f"Twist has non-finite values linear {list(linear)}, angular "
                                           f"{list(angular)}")
        d = self._by_name[TWIST]
        d.raw = (float(linear[0]), float(linear[1]), float(linear[2]))
        return self._accept(d, t)

    def update(self, source: str, action, t: float, *, channels=None, hold: bool = False) -> bool:
        """Any other operator (a scripted one in a bench, a custom device) in policy-action units.

        action [len(channels)] (channels None: [action_dim], every channel); a channel counts as moved
        where |value| > 0; hold=True takes over whatever the values (a scripted operator commanding
        stillness). Values are clipped to [-1, 1]."""
        if source in (POLICY, JOY, TWIST):
            raise ValueError(f"update(): '{source}' is reserved; Joy and Twist samples go to update_joy / "
                             f"update_twist")
        d = self._by_name.get(source)
        chans = tuple(range(self.cfg.action_dim)) if channels is None else tuple(int(c) for c in channels)
        if d is None or tuple(d.channels) != chans:
            if d is None:
                self._check_channels(f"operator source '{source}'", [c for c in chans
                                                                    if c != self.cfg.gripper_channel])
                d = self._add(_Device(source, chans, self.cfg.action_dim))
                self.rejected[source] = 0
            else:
                d.channels = np.asarray(chans, dtype=np.intp)
                d.moved[:] = False
        if len(action) != len(chans):
            return self._reject(source, f"operator '{source}' sent {len(action)} values for {len(chans)} channels")
        for v in action:
            if not math.isfinite(v):
                return self._reject(source, f"operator '{source}' sent non-finite values {list(action)}")
        d.raw = tuple(float(v) for v in action)
        d.hold = bool(hold)
        return self._accept(d, t)

    def _accept(self, d: _Device, t: float) -> bool:
        d.stamp, d.dirty = t, True
        d.received += 1
        if d.status != DEVICE_LIVE:
            self._notices.append(f"operator input '{d.name}': " + ("first input" if d.status == DEVICE_NONE
                                                                  else "input again after silence"))
            d.status = DEVICE_LIVE
        return True

    def _reject(self, source: str, reason: str) -> bool:
        self.rejected[source] = self.rejected.get(source, 0) + 1
        self.last_reject_reason = reason
        return False

    def label(self, success: bool, source: str, t: float) -> None:
        """Queue an episode label from elsewhere (a service call, a scripted operator)."""
        self._labels.append(Label(bool(success), source, t))

    def drain_labels(self) -> list[Label]:
        """Labels since the last call, oldest first."""
        out, self._labels = self._labels, []
        return out

    def drain_notices(self) -> list[str]:
        """Device status changes since the last call (first input, silent and released, back), to log once."""
        out, self._notices = self._notices, []
        return out

    @property
    def has_labels(self) -> bool:
        return bool(self._labels)

    @property
    def has_notices(self) -> bool:
        return bool(self._notices)

    def devices(self) -> dict[str, str]:
        """Device name -> 'none' (never heard from), 'live' or 'silent'."""
        return {d.name: d.status for d in self._devices}

    def received(self) -> dict[str, int]:
        return {d.name: d.received for d in self._devices}

    # ---- the decision -------------------------------------------------------------------------
    def _map(self, d: _Device) -> None:
        """Newest raw input -> values and moved mask on the device's channels."""
        d.dirty = False
        if d.name == JOY:
            dz = self.cfg.joy.deadzone
            for v, ch, s in zip(d.raw, self._joy_channels, self._joy_scale):
                mag = min(abs(v), 1.0)
                moved = mag > dz
                d.moved[ch] = moved
                d.values[ch] = max(-1.0, min(1.0, s * math.copysign((mag - dz) / (1.0 - dz), v))) if moved else 0.0
        elif d.name == TWIST:
            tw = self.cfg.twist
            for v, ch in zip(d.raw, tw.channels):
                moved = abs(v) > tw.deadband
                d.moved[ch] = moved
                d.values[ch] = max(-1.0, min(1.0, tw.scale * v)) if moved else 0.0
        else:
            for v, ch in zip(d.raw, d.channels):
                d.moved[ch] = v != 0.0
                d.values[ch] = max(-1.0, min(1.0, v))
        d.any_moved = bool(d.moved.any())

    def _release(self, d: _Device) -> None:
        d.hold = d.grip = d.pending = d.any_moved = False
        d.moved[:] = False
        d.status = DEVICE_SILENT
        self._notices.append(f"operator input '{d.name}': silent for more than {self.cfg.timeout:g} s, released "
                             f"(the policy acts)")

    def end_intervention(self) -> None:
        """Forget an ongoing intervention (the caller left the policy's mode): an operator still active at
        the next step() begins a new one."""
        self.intervening, self._gripper_set = False, False

    def expire(self, t: float) -> None:
        """Release devices silent for more than `timeout` at time t (step() does this itself; call it
        while not stepping, e.g. outside the policy's mode, so silence is still noticed)."""
        for d in self._devices:
            if d.status == DEVICE_LIVE and t - d.stamp > self.cfg.timeout:
                self._release(d)

    def step(self, policy_action: np.ndarray, t: float) -> tuple[np.ndarray, str, bool]:
        """policy_action [a] in [-1, 1], t (s, the inputs' clock) -> (executed action [a], source, intervened).

        While no operator acts, the executed action IS policy_action (the same array, no copy, no
        allocation). Otherwise it is an internal buffer, valid until the next step: copy it to keep it."""
        self.steps += 1
        timeout = self.cfg.timeout
        active = None  # allocated only when some device acts
        for d in self._devices:
            if d.status != DEVICE_LIVE:
                continue
            if t - d.stamp > timeout:
                self._release(d)
                continue
            if d.dirty:
                self._map(d)
            if d.hold or d.any_moved or d.grip or d.pending:
                if active is None:
                    active = []
                active.append(d)
        if active is None:
            if self.intervening:
                self.intervening, self._gripper_set = False, False
            self.source, self.intervened = POLICY, False
            return policy_action, POLICY, False

        out, per_axis, gc = self._out, self.cfg.per_axis, self.cfg.gripper_channel
        np.clip(policy_action, -1.0, 1.0, out=out)
        if not self.intervening:
            self.intervening = True
            self.interventions += 1
            if gc is not None and not self._gripper_set:
                self._gripper = float(out[gc])  # hold the gripper where it is unless a button says otherwise
        held = any(d.hold for d in active)
        if gc is not None and (not per_axis or held or self._gripper_set):
            out[gc] = self._gripper  # (a source that maps the gripper channel itself overrides it below)
        for d in reversed(active):  # held-still channels first, the first device last (it wins)
            if d.hold or not per_axis:
                out[d.channels] = d.values[d.channels]
        for d in reversed(active):  # then moved channels, which beat held-still ones
            if d.any_moved:
                np.copyto(out, d.values, where=d.moved)
        source = next((d.name for d in active if d.any_moved or d.grip or d.pending), active[0].name)
        for d in active:  # a press between ticks has now acted for one tick
            d.pending = False
        self.intervened_steps += 1
        self.source, self.intervened = source, True
        return out, source, True

    @property
    def intervention_rate(self) -> float:
        """Fraction of step() calls in which the operator acted (NaN before the first)."""
        return self.intervened_steps / self.steps if self.steps else math.nan

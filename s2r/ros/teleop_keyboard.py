"""Keyboard teleop for the policy node's operator input: a terminal, no X or GUI, works over SSH.

    python -m s2r.ros.teleop_keyboard [--ros-args -p speed:=0.5 -p twist_topic:=/spacenav/twist ...]

Reads single keys from the terminal (stdin in raw mode: no echo, no line buffering; the terminal's
settings are restored on exit, Ctrl-C, SIGINT, SIGTERM and SIGHUP, e.g. a dropped SSH session) and
publishes, every 1/rate_hz s while it runs:

    twist_topic  geometry_msgs/Twist  linear = speed x the held motion keys (end-effector step
                 direction in the arm's base frame; the node turns it into action units with
                 twist_scale); angular always 0
    joy_topic    sensor_msgs/Joy      zero axes (joy_axes_count of them) and the buttons below at
                 the policy node's default indices (set the same *_button parameters on both)

Key map (letters in either case):

    w / s   +x / -x  (forward / back)          space  hold to intervene: the operator takes over,
    a / d   +y / -y  (left / right)                   the arm holds still where no key moves it
    r / f   +z / -z  (up / down)               g      toggle the gripper (close, open, ...)
    + / -   speed x 1.25 / / 1.25              1      label the episode a success (ends it)
    x       release every key now              0      label the episode a failure (ends it)
    q, Ctrl-C  quit (sends a released state first)

A terminal reports key presses, not releases: a key counts as held from its press until
`hold_first` s later (longer than the keyboard's autorepeat delay, typically 0.25-0.6 s), then,
once it autorepeats, until `hold_repeat` s after its newest repeat. Releasing a key therefore stops
the motion about hold_repeat s later (hold_first for a single tap). The gripper, success and failure
keys are presses: their button is set in one Joy message. The gripper command acts while the operator
acts (hold space to keep it; control/operator.py).

`KeyboardTeleop` is the key -> message logic without ROS or a terminal (tests call it directly);
`TeleopKeyboardNode` publishes it; `main()` owns the terminal. Needs rclpy and the sensor/geometry
message packages, like the other s2r.ros nodes.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import termios
import time
from dataclasses import dataclass, field

import rclpy
from geometry_msgs.msg import Twist
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import Joy

from s2r.control.operator import JoyMapping

MOTION_KEYS = {"w": (0, 1.0), "s": (0, -1.0), "a": (1, 1.0), "d": (1, -1.0), "r": (2, 1.0), "f": (2, -1.0)}
HOLD_KEY = " "
QUIT_KEYS = ("q", "\x03", "\x04")  # q, Ctrl-C, Ctrl-D
HELP = """s2r keyboard teleop  (publishing {twist} and {joy})
  w/s +x/-x   a/d +y/-y   r/f +z/-z   space: hold to intervene   g: gripper close/open
  1: success  0: failure  +/-: speed  x: release all  q or Ctrl-C: quit"""


@dataclass
class TeleopConfig:
    speed: float = 0.5  # twist units per held motion key
    hold_first: float = 0.6  # s a key counts as held after its first press (beyond the autorepeat delay)
    hold_repeat: float = 0.15  # s after each autorepeat (repeats come every ~0.03-0.05 s)
    joy_axes_count: int = 8  # axes in each Joy message (zeros; the node's joy_axes must index below this)
    buttons: dict[str, int] = field(default_factory=lambda: JoyMapping().buttons())  # role -> Joy button index


class KeyboardTeleop:
    """Key presses -> the Twist linear [3] and Joy buttons [n] to publish; no ROS, no terminal."""

    def __init__(self, cfg: TeleopConfig | None = None):
        self.cfg = cfg or TeleopConfig()
        self.speed = self.cfg.speed
        self._until: dict[str, float] = {}  # held key -> time it stops counting as held
        self._pulses: set[str] = set()  # button roles to set in the next Joy message
        self.gripper_closed = False  # what the next g press asks for: open if closed
        self.quit = False

    def key(self, ch: str, t: float) -> str:
        """One key at time t (s). Returns what it did, in words (for the status line)."""
        ch = ch.lower() if ch.isalpha() else ch
        if ch in QUIT_KEYS:
            self.quit = True
            return "quit"
        if ch in MOTION_KEYS or ch == HOLD_KEY:
            held = t < self._until.get(ch, -1.0)
            self._until[ch] = t + (self.cfg.hold_repeat if held else self.cfg.hold_first)
            return "intervene" if ch == HOLD_KEY else f"move {ch}"
        if ch == "g":
            self.gripper_closed = not self.gripper_closed
            self._pulses.add("gripper_close" if self.gripper_closed else "gripper_open")
            return "gripper close" if self.gripper_closed else "gripper open"
        if ch in ("1", "0"):
            self._pulses.add("success" if ch == "1" else "failure")
            return "label success" if ch == "1" else "label failure"
        if ch in ("+", "="):
            self.speed *= 1.25
            return f"speed {self.speed:.3g}"
        if ch == "-":
            self.speed /= 1.25
            return f"speed {self.speed:.3g}"
        if ch == "x":
            self.release()
            return "released"
        return ""

    def release(self) -> None:
        self._until.clear()
        self._pulses.clear()

    def held(self, t: float) -> list[str]:
        return [k for k, until in self._until.items() if t < until]

    def twist(self, t: float) -> tuple[float, float, float]:
        """Linear x, y, z at time t: speed per held motion key (opposite keys cancel)."""
        lin = [0.0, 0.0, 0.0]
        for k in self.held(t):
            if k in MOTION_KEYS:
                axis, sign = MOTION_KEYS[k]
                lin[axis] += sign * self.speed
        return lin[0], lin[1], lin[2]

    def buttons(self, t: float) -> list[int]:
        """The Joy buttons at time t; presses (gripper, labels) appear in this one message only."""
        idx = {r: i for r, i in self.cfg.buttons.items() if i >= 0}
        out = [0] * (max(idx.values(), default=-1) + 1)
        if HOLD_KEY in self.held(t) and "intervene" in idx:
            out[idx["intervene"]] = 1
        for role in self._pulses:
            if role in idx:
                out[idx[role]] = 1
        self._pulses.clear()
        return out

    def axes(self) -> list[float]:
        return [0.0] * self.cfg.joy_axes_count


class TeleopKeyboardNode(Node):
    """Reads keys from a file descriptor (a terminal in raw mode) and publishes Twist + Joy at rate_hz."""

    def __init__(self, fd: int, out=None, node_name: str = "s2r_teleop_keyboard", **kwargs):
        super().__init__(node_name, **kwargs)
        d = JoyMapping()
        self.declare_parameter("twist_topic", "/spacenav/twist")
        self.declare_parameter("joy_topic", "/joy")
        self.declare_parameter("rate_hz", 20.0)  # > 1 / the policy node's operator_timeout (0.25 s)
        self.declare_parameter("speed", TeleopConfig.speed)
        self.declare_parameter("joy_axes_count", TeleopConfig.joy_axes_count)
        for role, index in d.buttons().items():  # joy_intervene_button, ...: as the policy node's
            self.declare_parameter(f"joy_{role}_button", index)
        p = lambda name: self.get_parameter(name).value  # noqa: E731
        self.teleop = KeyboardTeleop(TeleopConfig(
            speed=float(p("speed")), joy_axes_count=int(p("joy_axes_count")),
            buttons={role: int(p(f"joy_{role}_button")) for role in d.buttons()}))
        self.twist_topic, self.joy_topic = str(p("twist_topic")), str(p("joy_topic"))
        self.pub_twist = self.create_publisher(Twist, self.twist_topic, 10)
        self.pub_joy = self.create_publisher(Joy, self.joy_topic, 10)
        self.fd, self.out = fd, out
        self.create_timer(1.0 / float(p("rate_hz")), self._tick)

    def _tick(self) -> None:
        t = time.monotonic()
        while not self.teleop.quit and select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 64)
            if not data:  # end of input: the terminal went away
                self.teleop.quit = True
                break
            for ch in data.decode(errors="ignore"):
                said = self.teleop.key(ch, t)
                if said and self.out is not None:
                    self.out.write(f"\r{said:<40}")
                    self.out.flush()
        if self.teleop.quit:
            raise KeyboardInterrupt("quit key")  # leaves spin; main() sends a released state, restores the terminal
        self.publish(t)

    def publish(self, t: float) -> None:
        tw = Twist()
        tw.linear.x, tw.linear.y, tw.linear.z = self.teleop.twist(t)
        self.pub_twist.publish(tw)
        joy = Joy()
        joy.header.stamp = self.get_clock().now().to_msg()
        joy.axes = self.teleop.axes()
        joy.buttons = self.teleop.buttons(t)
        self.pub_joy.publish(joy)


def raw_mode(fd: int) -> list:
    """Put a terminal in raw input mode (no echo, no line buffering, Ctrl-C as a key); output processing
    stays on, so prints still look normal. Returns the previous settings for restore()."""
    old = termios.tcgetattr(fd)
    new = termios.tcgetattr(fd)
    new[0] &= ~(termios.IXON | termios.ICRNL | termios.BRKINT | termios.INPCK | termios.ISTRIP)  # iflag
    new[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)  # lflag
    new[6][termios.VMIN], new[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSADRAIN, new)
    return old


def restore(fd: int, old: list) -> None:
    termios.tcsetattr(fd, termios.TCSADRAIN, old)


def main(args=None) -> int:
    fd = sys.stdin.fileno()
    if not os.isatty(fd):
        print("teleop_keyboard needs a terminal on stdin (run it in an interactive shell, or `ssh -t host ...`)",
              file=sys.stderr)
        return 2

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)  # our handlers restore the terminal
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    old = raw_mode(fd)
    node = None
    try:
        node = TeleopKeyboardNode(fd, out=sys.stdout)
        print(HELP.format(twist=node.twist_topic, joy=node.joy_topic), flush=True)
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        restore(fd, old)
        if node is not None:
            node.teleop.release()
            node.publish(time.monotonic())  # a released state, so the robot goes back to the policy at once
            for pub in (node.pub_twist, node.pub_joy):  # delivered before the process goes
                pub.wait_for_all_acked(Duration(seconds=0.5))
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
        print("", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

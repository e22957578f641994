"""control/safety.py: the robot-side safety filter's guarantees and its state machine.

Property tests feed arbitrary numbers (NaN, +-Inf, 1e300, wrong clocks, missing
arrays) and random mode requests, and check what the drives receive; example
tests pin one behaviour each.
"""

import math
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s2r.control.rotations import projected_gravity
from s2r.control.safety import Guard, Mode, SafetyConfig, SafetyFilter
from s2r.control.spec import RobotSpec

G1 = RobotSpec.load(Path(__file__).resolve().parents[1] / "sim/robots/g1/g1.yaml")
TINY = RobotSpec.from_dict({  # fixed base, no IMU; 64 Hz control (dt = 1/64 is exact in binary)
    "name": "tiny_arm", "physics_dt": 1 / 128, "decimation": 2,
    "joints": [
        {"name": "shoulder", "default": 0.3, "kp": 50.0, "kd": 1.0, "range": [-1.0, 2.0],
         "velocity_limit": 10.0, "torque_limit": 20.0},
        {"name": "elbow", "default": 0.0, "kp": 10.0, "kd": 0.5, "range": [-0.5, 0.5],
         "velocity_limit": 5.0, "torque_limit": 3.0},
    ]})
UPRIGHT = np.array([0.0, 0.0, -1.0])


class Bench:
    """Drives a filter the way the ROS node does, with a clean, still robot at pose `q`."""

    def __init__(self, spec, cfg=None):
        self.f = SafetyFilter(spec, cfg)
        self.dt = spec.control_dt
        self.k = 0
        self.q = self.f.default.copy()
        self.qd = np.zeros(spec.num_joints)
        self.g = UPRIGHT.copy()

    @property
    def t(self):
        return self.k * self.dt

    def step(self, q_target=None, stamp=None):
        self.k += 1
        return self.f.filter(self.t, q_target, self.q, self.qd, projected_gravity=self.g,
                             last_sensor_time=self.t if stamp is None else stamp)

    def to_passive_at_rest(self):
        """PASSIVE until the target has caught up with the measured pose, then start_ramp()."""
        for _ in range(1000):
            self.step()
            if self.f.start_ramp():
                return self
        raise AssertionError("start_ramp() never accepted")

    def to_policy(self):
        self.to_passive_at_rest()
        for _ in range(10_000):
            self.step()
            if self.f.start_policy():
                return self
        raise AssertionError("ramp never finished")


def pd(cmd, q, qd):
    return cmd.kp * (cmd.q_target - q) - cmd.kd * qd


# ---- properties: any input, safe output ------------------------------------------------

SPECIAL = [math.nan, math.inf, -math.inf, 1e300, -1e300, 0.0, 5e-324]


def number(lo, hi):
    return st.one_of(st.floats(lo, hi), st.sampled_from(SPECIAL), st.floats())


def vector(n, lo, hi):
    return st.one_of(st.none(), hnp.arrays(np.float64, n, elements=number(lo, hi)))


def steps(spec, cfg, clean_sensors):
    """Control steps with random mode requests and garbage targets; the sensors are either
    plausible and on time (clean_sensors) or, mostly plausible, often garbage."""
    nj = spec.num_joints
    lo, hi = np.array([j.range for j in spec.joints]).T
    q_lo, q_hi = lo - cfg.sensor_position_slack, hi + cfg.sensor_position_slack
    qd_max = cfg.sensor_velocity_scale * np.array(spec.array("velocity_limit"))
    q = st.tuples(*[st.floats(a, b) for a, b in zip(q_lo, q_hi)]).map(np.array)
    qd = st.tuples(*[st.floats(-v, v) for v in qd_max]).map(np.array)
    gravity = st.just(UPRIGHT)
    clock, age = st.just(1), st.sampled_from([0, 1])  # x dt
    if not clean_sensors:
        q = st.one_of(q, q, vector(nj, -4.0, 4.0))
        qd = st.one_of(qd, qd, vector(nj, -300.0, 300.0))
        gravity = st.one_of(gravity, gravity, vector(3, -1.5, 1.5))
        clock = st.sampled_from([1, 1, 1, 1, 0, 0.5, 3, -1, math.nan, math.inf, 1e300])
        age = st.sampled_from([0, 0, 0, 0, 0, 0, 1, 3, -1, math.nan, math.inf, -math.inf, 1e300])
    return st.lists(st.fixed_dictionaries({
        "clock": clock, "age": age, "q_target": vector(nj, -4.0, 4.0), "q": q, "qd": qd, "gravity": gravity,
        "request": st.sampled_from([None, None, None, None, "start_ramp", "start_policy", "estop",
                                    "reset_from_damping"]),
    }), min_size=1, max_size=12)


@pytest.mark.parametrize("spec", [G1, TINY], ids=["g1", "tiny"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_input_gives_finite_targets_and_gains_inside_every_limit(spec, data):
    dt = spec.control_dt
    cfg = SafetyConfig(ramp_time=2 * dt, estop_ramp_time=3 * dt)  # short, so every mode is reached
    bench = Bench(spec, cfg)
    if data.draw(st.booleans(), label="start in POLICY"):
        bench.to_policy()
    f = bench.f
    lo, hi = np.array([j.range for j in spec.joints]).T
    margin = cfg.position_margin * (hi - lo)
    rate = cfg.velocity_scale * np.array(spec.array("velocity_limit")) * dt
    limit = np.array(spec.array("torque_limit"))
    qd_plausible = cfg.sensor_velocity_scale * np.array(spec.array("velocity_limit"))
    prev = f.last_command.q_target.copy()
    t = bench.t
    clean_sensors = data.draw(st.booleans(), label="clean sensors")
    for s in data.draw(steps(spec, cfg, clean_sensors), label="steps"):
        if s["request"]:
            getattr(f, s["request"])()
        t = t + s["clock"] * dt
        cmd = f.filter(t, s["q_target"], s["q"], s["qd"], projected_gravity=s["gravity"],
                       last_sensor_time=t - s["age"] * dt)

        assert np.all(np.isfinite(cmd.q_target))
        assert np.all(cmd.q_target >= lo + margin - 1e-12) and np.all(cmd.q_target <= hi - margin + 1e-12)
        assert np.all(np.abs(cmd.q_target - prev) <= rate + 1e-12)
        assert np.all(np.isfinite(cmd.kp)) and np.all(cmd.kp >= 0)
        assert np.all(np.isfinite(cmd.kd)) and np.all(cmd.kd >= f.kd_floor * (1 - 1e-9))  # never cut
        assert np.all(cmd.tau_ff == 0)
        q, qd = s["q"], s["qd"]
        if (q is not None and qd is not None and np.all(np.isfinite(q)) and np.all(np.isfinite(qd))
                and np.all(np.abs(q - np.clip(q, lo, hi)) <= cfg.sensor_position_slack)
                and np.all(np.abs(qd) <= qd_plausible)):
            assert np.all(np.abs(pd(cmd, q, qd)) <= limit * (1 + 1e-9) + 1e-9)
        prev = cmd.q_target.copy()
    assert f.counters["internal_error"] == 0


# ---- the state machine -------------------------------------------------------------------

def test_start_up_is_passive_with_zero_stiffness_and_the_spec_damping():
    cmd = Bench(G1).step()
    assert cmd.mode is Mode.PASSIVE
    assert np.all(cmd.kp == 0) and np.all(cmd.kd == np.array(G1.array("kd")))


def test_start_policy_is_refused_before_the_ramp_completes_with_a_reason():
    b = Bench(G1, SafetyConfig(ramp_time=1.0))
    b.step()
    refused = b.f.start_policy()
    assert not refused and "start_ramp()" in refused.reason
    b.to_passive_at_rest()
    b.step()
    b.step()
    refused = b.f.start_policy()
    assert not refused and "not finished" in refused.reason
    assert b.f.mode is Mode.RAMP_TO_DEFAULT


def test_ramp_to_default_reaches_the_default_pose_at_the_configured_time():
    b = Bench(TINY, SafetyConfig(ramp_time=0.5))  # 32 control steps of 1/64 s
    start = np.array([-0.5, 0.3])
    b.q = start.copy()
    b.step()
    refused = b.f.start_ramp()  # the passive target moves to the measured pose at the rate limit first
    assert not refused and "catching up" in refused.reason
    b.to_passive_at_rest()

    def tracked_step():  # the drives follow the target
        cmd = b.step()
        b.q = cmd.q_target.copy()
        return cmd

    first = tracked_step()  # the ramp starts here, from the measured pose
    np.testing.assert_allclose(first.q_target, start)
    for _ in range(15):
        tracked_step()
    halfway = tracked_step()  # 16 steps = 0.25 s
    np.testing.assert_allclose(halfway.q_target, (start + b.f.default) / 2, atol=1e-12)
    for _ in range(15):
        tracked_step()
    assert not b.f.start_policy()  # 0.484 s
    done = tracked_step()  # 0.5 s
    np.testing.assert_allclose(done.q_target, b.f.default, atol=1e-12)
    np.testing.assert_array_equal(done.kp, [50.0, 10.0])
    assert b.f.start_policy() and b.f.mode is Mode.POLICY


def test_estop_latches_damping_and_ramps_the_gains_down_without_a_torque_cut():
    T = 0.2  # s, 10 control steps on the G1
    b = Bench(G1, SafetyConfig(estop_ramp_time=T, kd_damp=1.0)).to_policy()
    offset = np.where(np.arange(13) % 2 == 0, 0.05, -0.05)
    for _ in range(5):
        before = b.step(b.f.default + offset)  # the robot has not followed: target != q
    kp_policy, kd_policy = before.kp.copy(), before.kd.copy()
    assert b.f.estop() and b.f.mode is Mode.DAMPING

    cmds = [b.step(b.f.default + offset) for _ in range(int(T / b.dt) + 5)]
    assert "estop" in cmds[0].guards
    np.testing.assert_allclose(pd(cmds[0], b.q, b.qd), pd(before, b.q, b.qd))  # no step in torque
    kp_step, kd_step = kp_policy * b.dt / T, (kd_policy - 1.0) * b.dt / T
    prev = before
    for c in cmds:
        assert np.all(prev.kp - c.kp >= -1e-12) and np.all(prev.kp - c.kp <= kp_step + 1e-9)
        assert np.all(prev.kd - c.kd >= -1e-12) and np.all(prev.kd - c.kd <= kd_step + 1e-9)
        assert np.all(c.kd >= 1.0 - 1e-12)  # kd never below kd_damp, never zero
        assert c.mode is Mode.DAMPING
        prev = c
    np.testing.assert_allclose(cmds[-1].kp, 0.0, atol=1e-12)
    np.testing.assert_allclose(cmds[-1].kd, 1.0)
    np.testing.assert_allclose(cmds[-1].q_target, b.q, atol=1e-12)  # damping posture: hold where it is
    assert not b.f.start_ramp() and not b.f.start_policy() and b.f.mode is Mode.DAMPING  # latched
    assert b.f.reason == "e-stop"


def test_reset_from_damping_needs_a_still_robot():
    b = Bench(TINY, SafetyConfig(estop_ramp_time=0.25)).to_policy()
    b.f.estop()
    b.step()
    assert "still running" in b.f.reset_from_damping().reason
    for _ in range(20):
        b.step()
    b.qd = np.array([0.0, 0.5])
    b.step()
    refused = b.f.reset_from_damping()
    assert not refused and "'elbow' moves at 0.500 rad/s" in refused.reason
    b.qd[:] = 0.0
    b.step()
    assert b.f.reset_from_damping() and b.f.mode is Mode.PASSIVE


# ---- guards ------------------------------------------------------------------------------

def test_watchdog_fires_at_the_first_step_after_two_control_periods_without_a_joint_state():
    b = Bench(G1).to_policy()
    last_fresh = b.t
    assert b.step(stamp=last_fresh).mode is Mode.POLICY  # 1 period old
    assert b.step(stamp=last_fresh).mode is Mode.POLICY  # 2 periods old: still within the timeout
    cmd = b.step(stamp=last_fresh)  # 3 periods
    assert cmd.mode is Mode.DAMPING and "watchdog" in cmd.guards
    assert b.f.reason.startswith("watchdog")


def test_ticks_before_the_first_joint_state_fire_the_guards_but_are_not_counted_as_interventions():
    b = Bench(G1)
    q0 = b.q.copy()
    b.q[:] = math.nan  # the node's joint state before the first message
    for _ in range(5):
        cmd = b.step(stamp=-math.inf)
        assert {"watchdog", "sensor_guard"} <= set(cmd.guards) and cmd.mode is Mode.PASSIVE
    assert b.f.counters["watchdog"] == b.f.counters["sensor_guard"] == 0  # a robot not up yet is no fault
    b.q[:] = q0
    b.step()
    last = b.t
    for _ in range(3):  # then the joint states stop: that is counted, in PASSIVE too
        cmd = b.step(stamp=last)
    assert "watchdog" in cmd.guards and b.f.counters["watchdog"] >= 1


def test_nan_joint_state_is_a_stale_sample_and_latches_damping_if_it_persists():
    b = Bench(G1).to_policy()
    b.q[4] = math.nan
    cmd = b.step()
    assert "sensor_guard" in cmd.guards and cmd.mode is Mode.POLICY  # one bad sample is tolerated
    b.step()
    assert b.step().mode is Mode.DAMPING  # the last valid sample is now 3 periods old
    assert np.all(np.isfinite(b.f.last_command.q_target))


def test_attitude_beyond_the_limit_latches_damping():
    b = Bench(G1).to_policy()

    def tilt(roll):  # projected gravity of a base rolled about x, via the sim's quaternion helpers
        quat = torch.tensor([[math.cos(roll / 2), math.sin(roll / 2), 0.0, 0.0]], dtype=torch.float64)
        return projected_gravity(quat)[0].numpy()

    b.g = tilt(0.7)
    assert b.step().mode is Mode.POLICY
    b.g = tilt(-0.9)
    cmd = b.step()
    assert cmd.mode is Mode.DAMPING and "attitude_guard" in cmd.guards and "roll -0.900" in b.f.reason
    b.g = UPRIGHT
    b.step()
    assert b.f.mode is Mode.DAMPING  # latched


def test_attitude_from_rpy_checks_pitch():
    b = Bench(G1).to_policy()
    cmd = b.f.filter(b.t + b.dt, None, b.q, b.qd, rpy=[0.0, 0.85, 0.3], last_sensor_time=b.t + b.dt)
    assert cmd.mode is Mode.DAMPING and "attitude_guard" in cmd.guards


def test_nan_target_holds_the_previous_target_and_counts_a_nan_guard():
    b = Bench(G1).to_policy()
    held = b.step(b.f.default + 0.01).q_target
    target = b.f.default - 0.01
    target[3], target[5] = math.nan, math.inf
    cmd = b.step(target)
    assert cmd.q_target[3] == held[3] and cmd.q_target[5] == held[5]
    np.testing.assert_allclose(cmd.q_target[[0, 1, 2, 4]], target[[0, 1, 2, 4]])
    assert "nan_guard" in cmd.guards and b.f.counters["nan_guard"] == 1


def test_huge_target_is_clipped_inside_the_margin_at_the_rate_limit():
    b = Bench(TINY).to_policy()
    first = b.step(np.array([1e300, -1e300]))
    assert {"position_clip", "rate_limit"} <= set(first.guards)
    np.testing.assert_allclose(np.abs(first.q_target - b.f.default), [10 / 64, 5 / 64])
    for _ in range(100):
        cmd = b.step(np.array([1e300, -1e300]))
        b.q = cmd.q_target.copy()  # the robot follows
    np.testing.assert_allclose(cmd.q_target, [2.0 - 0.06, -0.5 + 0.02])


def test_torque_guard_keeps_the_predicted_pd_torque_within_the_limit():
    b = Bench(TINY).to_policy()  # elbow: kp 10, torque limit 3 N m -> at most 0.3 rad of error
    for _ in range(20):
        cmd = b.step(np.array([0.3, 0.45]))  # the robot is stuck at the default pose
    assert "torque_guard" in cmd.guards
    assert cmd.q_target[1] == pytest.approx(0.3)
    assert abs(pd(cmd, b.q, b.qd)[1]) == pytest.approx(3.0)


def test_velocity_guard_stops_pd_torque_pushing_a_joint_past_its_velocity_limit():
    b = Bench(TINY).to_policy()
    b.qd = np.array([0.0, 6.0])  # elbow limit 5 rad/s
    cmd = b.step(np.array([0.3, 0.45]))
    assert "velocity_guard" in cmd.guards
    assert pd(cmd, b.q, b.qd)[1] <= 1e-12


def test_configuration_errors_name_the_joint():
    no_damping = RobotSpec.from_dict({"name": "x", "physics_dt": 0.01, "decimation": 1, "joints": [
        {"name": "wrist", "kp": 5.0, "kd": 0.0, "range": [-1, 1], "velocity_limit": 1.0, "torque_limit": 1.0}]})
    with pytest.raises(ValueError, match="joint 'wrist' damping gain kd_damp"):
        SafetyFilter(no_damping)
    SafetyFilter(no_damping, SafetyConfig(kd_damp=0.2))
    torque_robot = RobotSpec.load(Path(__file__).resolve().parents[1] / "sim/robots/gym_humanoid/humanoid.yaml")
    with pytest.raises(ValueError, match="joint_torque"):
        SafetyFilter(torque_robot)


def test_torque_guard_off_leaves_a_saturating_target_to_the_drive():
    """SafetyConfig.torque_guard=False: a target passes the position and rate limits only (the drive saturates,
    as the simulator's actuators do); with the guard it is pulled into the torque window."""
    stiff = RobotSpec.from_dict({"name": "stiff", "physics_dt": 1 / 128, "decimation": 2, "joints": [
        {"name": "wrist", "default": 0.0, "kp": 1000.0, "kd": 100.0, "range": [-2.0, 2.0],
         "velocity_limit": 10.0, "torque_limit": 12.0}]})
    out = {}
    for guard in (True, False):
        b = Bench(stiff, SafetyConfig(torque_guard=guard, ramp_time=0.05)).to_passive_at_rest()
        for _ in range(10):
            b.step()
        assert b.f.start_policy()
        cmd = b.step(b.q + 0.5)
        out[guard] = (float(cmd.q_target[0] - b.q[0]), cmd.guards)
    step = 10.0 * stiff.control_dt  # velocity_limit x dt: 0.156 rad, 156 N m of PD torque
    assert out[False] == (pytest.approx(step), ["rate_limit"])
    assert out[True] == (pytest.approx(12.0 / 1000.0), ["rate_limit", "torque_guard"])

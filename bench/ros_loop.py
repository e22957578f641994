"""ROS 2 control loop: the policy node's control-period jitter, sensor-to-command latency and per-tick cost over
loopback DDS, with the tick on the node's timer and on the arrival of each joint state.

    python bench/ros_loop.py [--quick] [--seconds S] [--runs 50:timer,200:timer,200:sensor] [--sched normal,realtime]

Three OS processes, as on a robot (FastDDS on loopback, a private ROS_DOMAIN_ID,
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST):
    sim bridge   python -m s2r.ros.sim_bridge --ros-args -p gantry:=true   the MuJoCo G1 on its test stand,
                 /joint_states and /imu/data every 5 ms physics step (200 Hz), commands applied at each step
    policy node  python -m s2r.ros.policy_node --ros-args -p policy_path:=... -p rate_hz:=... -p trigger:=...
    this script  a probe node: calls ~/ramp, then ~/start once the ramp is done, and records
                 /joint_position_controller/commands and /s2r_policy/diagnostics
The sim bridge runs for the whole benchmark; a policy node is started for each (rate, trigger, scheduling):
    50 Hz   robot spec sim/robots/g1/g1.yaml        (decimation 4)
    200 Hz  robot spec sim/robots/g1/g1_200hz.yaml  (the same robot, decimation 1)
    timer     trigger:=timer (the node's default): the tick runs on an rclpy timer at rate_hz and uses the
              newest joint state, whatever its age
    sensor    trigger:=sensor: the tick runs in the /joint_states callback as soon as a joint state arrives
              (at most once per 0.9 / rate_hz); the timer stands in when no tick ran for 1.5 periods
    normal    the node as launched by default (SCHED_OTHER)
    realtime  realtime:=true: the node's control thread asks for SCHED_FIFO 50 (reported if refused)
By default 50 Hz runs with the timer, 200 Hz with the timer and with the sensor trigger, each with both
schedulings: six node runs, interleaved so that every combination sees the machine in a similar state.
The policy is the humanoid-walk recipe's actor (512-256-128, relu) with random weights and a
non-trivial normaliser, exported the way `s2r export` writes it (policies/export.to_onnx_bytes, the
rate's spec and hash in the metadata; the node refuses a mismatch): timing does not depend on the
weights. The gantry holds the base upright, so the safety filter stays in POLICY and every tick runs
observation -> onnxruntime -> safety filter; the ticks measured outside POLICY are counted and reported.
The node's watchdog is set to --sensor-timeout (0.1 s): its default, two control periods, is 10 ms at
200 Hz, which the Python sim bridge itself overruns now and then on a loaded machine (DAMPING within
seconds); how often the default would have fired is reported (ticks whose sensor was older than 2 periods).

Measured over `seconds` per run, after POLICY is entered and a 1 s warm-up, from the node's
per-tick ~/diagnostics (every tick is one sample; ticks whose diagnostics did not reach the probe are
counted as missing):
    jitter      |period - 1/rate|; period = time.monotonic() between the starts of consecutive ticks in the
                node (timer: rclpy timer callbacks on the SingleThreadedExecutor of spin_node; sensor: the
                joint-state callbacks that ran a tick, so it follows the sim bridge's publish jitter)
    lateness    timer trigger only: callback start - its scheduled time (rcl's TimerInfo); `late` ticks
                started > 1 ms late
    dropped     timer trigger only: timer periods rcl skipped because a tick came more than a period late
    sensor ticks  sensor trigger only: ticks run by a joint state's arrival (the rest ran on the standby
                timer, when no tick ran for 1.5 periods, e.g. after a joint state that came less than
                0.9 periods after the last tick and was passed over; or on the watchdog)
    sensor age  inside the node: command publish - arrival (subscription callback) of the newest joint
                state, the one the command was computed from. Timer trigger: the node's timer and the
                bridge's are not synchronised, so this includes waiting for the next tick (0 to 1 bridge
                period, 5 ms).
                Both run at multiples of 200 Hz, so the phase between them, and with it this wait, stays
                nearly constant within a run and differs between runs: read p50 across runs as a draw
                from 0-5 ms plus the fixed costs
    latency     sensor-to-command over DDS: the command's DDS reception at the probe - the DDS source
                timestamp the sim bridge's joint state was written with (both FastDDS timestamps on
                the system clock of this one machine). It includes the joint state's DDS hop to the
                node, the node's executor dispatch, the wait for the tick, observation + inference +
                safety filter, and the command's publish and DDS hop to a subscriber; it excludes the
                physics step and the probe's own executor. Tick n publishes the node's n-th command
                (DDS publication sequence number n) and diagnostics with ticks = n naming that joint
                state's source timestamp: that is how a command is matched to its sensor sample.
                With the sensor trigger there is no wait for a tick: the latency is the two DDS hops,
                the executor's dispatch and the tick's work; it is also reported for the ticks run by a
                joint state alone (a tick on the standby timer or the watchdog uses an older state).
    tick cost   the node's tick_cost_s: observation + inference + action + safety filter of one tick (the
                command's publish and the diagnostics are outside it), in microseconds; only ticks that
                ran the policy count (mode POLICY and policy_steps one more than the tick before), so
                every sample includes inference; POLICY ticks without inference are counted and reported
    inference   the onnxruntime call alone (inference_last_s)
    bridge      the sim bridge's own publish jitter and largest gap, from the /joint_states source timestamps
    cpu         each process's CPU time over the window / wall time (1.0 = one core, all threads)
The last line is one JSON object. Its headlines, each taken from the `realtime` run when it was measured
and SCHED_FIFO was granted, else from the `normal` run (`headline_sched` says which), with the goals
on the 2-core development machine:
    jitter_p99_ms_200hz           200 Hz, timer trigger               goal <= 1 ms
    latency_p99_ms_200hz_sensor   200 Hz, sensor trigger              goal <= 1 ms
    tick_p99_us                   200 Hz, timer trigger, POLICY ticks goal <= 100 us
`latency_p99_ms_200hz` is the timer trigger's latency p99 at 200 Hz (no goal: it includes the wait for
the tick).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnxruntime
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile
from rclpy.utilities import get_rmw_implementation_identifier
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from s2r.bench_util import machine_info
from s2r.ros import call_trigger

ROOT = Path(__file__).resolve().parents[1]
SPECS = {50: ROOT / "sim/robots/g1/g1.yaml", 200: ROOT / "sim/robots/g1/g1_200hz.yaml"}
BRIDGE_SPEC = SPECS[50]  # the bridge steps every physics step whatever the control rate
BRIDGE_PERIOD = 0.005  # s, the G1's physics step
CMD_TOPIC = "/joint_position_controller/commands"
DIAG_TOPIC = "/s2r_policy/diagnostics"
LATE_S = 1e-3  # a tick that starts later than this after its schedule counts as late
GOAL_P99_MS = 1.0  # jitter p99, 200 Hz, timer trigger
GOAL_LATENCY_SENSOR_P99_MS = 1.0  # sensor-to-command latency p99, 200 Hz, sensor trigger
GOAL_TICK_P99_US = 100.0  # per-tick cost p99 in POLICY, 200 Hz, timer trigger
DEFAULT_RUNS = "50:timer,200:timer,200:sensor"  # rate_hz:trigger
TRIGGERS = ("timer", "sensor")
RAMP_TIME = 0.3  # s
SENSOR_TIMEOUT = 0.1  # s, the node's watchdog here (its default, 2 control periods, is 10 ms at 200 Hz)
WARMUP_S = 1.0


# ---- the policy ------------------------------------------------------------------------------------

def export_policy(spec_path: Path, out: Path) -> dict:
    """The humanoid-walk recipe's actor, random weights, exported for `spec_path`; returns its description."""
    import torch

    from s2r.control.onnx_policy import (META_ACTION_DIM, META_ALGO, META_EXPORTER, META_OBS_DIM,
                                         META_POLICY_HEAD, META_RUN_ID, META_SPEC, META_SPEC_HASH)
    from s2r.control.spec import RobotSpec
    from s2r.policies.export import DeterministicPolicy, exporter_version, to_onnx_bytes
    from s2r.policies.networks import TanhGaussianActor
    from s2r.policies.normalizer import RunningNorm
    from s2r.policies.recipes import recipe

    spec = RobotSpec.load(spec_path)
    agent = recipe("humanoid-walk").agent
    obs_dim, act_dim = spec.observation.dim, spec.action_dim
    torch.manual_seed(0)
    actor = TanhGaussianActor(obs_dim, act_dim, agent.actor_hidden, activation=agent.activation)
    norm = RunningNorm(obs_dim)
    norm.update(torch.randn(4096, obs_dim) * 0.5)
    meta = {META_SPEC_HASH: spec.hash(), META_SPEC: json.dumps(spec.to_dict()), META_ALGO: "sac",
            META_POLICY_HEAD: "gaussian", META_RUN_ID: f"bench-ros-loop-{spec.name}", META_OBS_DIM: str(obs_dim),
            META_ACTION_DIM: str(act_dim), META_EXPORTER: exporter_version(17)}
    out.write_bytes(to_onnx_bytes(DeterministicPolicy(actor, norm), obs_dim, meta, 17))
    return {"actor_hidden": list(agent.actor_hidden), "activation": agent.activation, "obs_dim": obs_dim,
            "action_dim": act_dim, "spec": spec.name, "spec_hash": spec.hash()}


# ---- processes ---------------------------------------------------------------------------------------

def launch(module: str, params: dict, env: dict, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", module, "--ros-args"]
    for k, v in params.items():
        args += ["-p", f"{k}:={v}"]
    with open(log, "w") as f:
        return subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (spin_node exits cleanly), then SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tail(log: Path, n: int = 15) -> str:
    try:
        return "\n".join(log.read_text().splitlines()[-n:])
    except OSError:
        return ""


# ---- the probe node ----------------------------------------------------------------------------------

class Probe:
    """This script's ROS node: records commands (with their DDS timestamps) and diagnostics, calls services."""

    def __init__(self, domain_id: int):
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        self.node = Node("s2r_ros_loop_probe", context=self.ctx)
        self.cmds: list[tuple[int, int, int]] = []  # (publication sequence number, received ns, source ns)
        self.diags: list[str] = []  # raw JSON, parsed after the run
        self.joint_states: list[int] = []  # DDS source timestamps of /joint_states (the bridge's publish times)
        qos = QoSProfile(depth=500)  # reliable; deep enough that a busy probe loses nothing
        self.node.create_subscription(Float64MultiArray, CMD_TOPIC, self._on_cmd, qos)
        self.node.create_subscription(String, DIAG_TOPIC, self._on_diag, qos)
        self.node.create_subscription(JointState, "/joint_states", self._on_joint_state, qos)
        self.clients = {s: self.node.create_client(Trigger, f"/s2r_policy/{s}") for s in ("ramp", "start")}
        self.ex = SingleThreadedExecutor(context=self.ctx)
        self.ex.add_node(self.node)
        self.thread = threading.Thread(target=self.ex.spin, daemon=True)
        self.thread.start()

    def _on_cmd(self, _msg, info) -> None:
        self.cmds.append((info.get("publication_sequence_number") or -1, info["received_timestamp"],
                          info["source_timestamp"]))

    def _on_joint_state(self, _msg, info) -> None:
        self.joint_states.append(info["source_timestamp"])

    def _on_diag(self, msg) -> None:
        self.diags.append(msg.data)

    def newest(self) -> dict:
        return json.loads(self.diags[-1]) if self.diags else {}

    def reset(self) -> None:
        self.cmds, self.diags, self.joint_states = [], [], []

    def call(self, service: str, timeout: float = 10.0):
        return call_trigger(self.clients[service], wait_s=timeout, reply_s=timeout)

    def close(self) -> None:
        self.ex.shutdown(timeout_sec=2.0)
        self.thread.join(timeout=2.0)
        self.node.destroy_node()
        self.ctx.try_shutdown()


def wait_until(cond, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    t_end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"the policy node exited (code {proc.returncode}) while waiting for {what}:\n"
                               f"{tail(log)}")
        if time.monotonic() > t_end:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}:\n{tail(log)}")
        time.sleep(0.01)


# ---- one measurement ---------------------------------------------------------------------------------

def measure(probe: Probe, rate: int, trigger: str, sched: str, policy: Path, seconds: float, sensor_timeout: float,
            env: dict, tmp: Path, bridge: subprocess.Popen) -> dict:
    log = tmp / f"policy_node_{rate}hz_{trigger}_{sched}.log"
    probe.reset()
    node = launch("s2r.ros.policy_node", {"policy_path": policy, "robot_spec": SPECS[rate], "rate_hz": f"{rate:.1f}",
                                          "trigger": trigger, "ramp_time": RAMP_TIME,
                                          "sensor_timeout": sensor_timeout,
                                          "realtime": str(sched == "realtime").lower()},
                  env, log)
    try:
        wait_until(lambda: probe.newest().get("joint_states_received", 0) >= 20, 60.0,
                   "diagnostics with joint states from the sim bridge", node, log)
        if not probe.newest().get("policy_loaded"):
            raise RuntimeError(f"the node refused the policy: {probe.newest().get('policy_error')}")
        for service in ("ramp", "start"):  # each retried while the node says "not yet" (stale sensor, ramp running)
            t_end = time.monotonic() + RAMP_TIME + 10.0
            while not (resp := probe.call(service)).success:
                if time.monotonic() > t_end:
                    raise RuntimeError(f"~/{service} refused: {resp.message}")
                time.sleep(0.05)
        time.sleep(WARMUP_S)
        d0, c0_node, c0_bridge, t0 = probe.newest(), cpu_seconds(node.pid), cpu_seconds(bridge.pid), time.monotonic()
        js0 = len(probe.joint_states)
        time.sleep(seconds)
        d1, c1_node, c1_bridge, t1 = probe.newest(), cpu_seconds(node.pid), cpu_seconds(bridge.pid), time.monotonic()
        js_sent = np.array(probe.joint_states[js0:], dtype=np.int64)  # [N] bridge publish times, ns
        time.sleep(0.2)  # the window's last commands and diagnostics arrive
        load = os.getloadavg()[0]
    finally:
        stop(node)
    wall = t1 - t0
    r = analyse(probe, rate, trigger, d0, d1, wall, js_sent)
    r.update(sched=sched, realtime=d1.get("realtime", "?"), final_mode=d1.get("mode"),
             final_reason=d1.get("reason", ""), cpu_policy_node=round((c1_node - c0_node) / wall, 3),
             cpu_sim_bridge=round((c1_bridge - c0_bridge) / wall, 3), load_avg_1m=round(load, 2))
    return r


def pct(x: list[float] | np.ndarray, scale: float = 1e3) -> dict:
    """p50 / p99 / max of x (seconds) in ms (scale 1e6: in us); NaN-free input."""
    a = np.asarray(x, dtype=np.float64) * scale
    if a.size == 0:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "max": round(float(a.max()), 3)}


def analyse(probe: Probe, rate: int, trigger: str, d0: dict, d1: dict, wall: float, js_sent: np.ndarray) -> dict:
    k0, k1 = d0["ticks"], d1["ticks"]  # the window: ticks k0+1 .. k1
    diags = {}
    for raw in list(probe.diags):
        d = json.loads(raw)
        if k0 < d["ticks"] <= k1:
            diags[d["ticks"]] = d
    ds = [diags[k] for k in sorted(diags)]
    nominal = 1.0 / rate
    period = np.array([d["period_last_s"] for d in ds])
    late = np.array([d["tick_late_s"] for d in ds])
    age = np.array([d["sensor_age_s"] for d in ds])
    inference = np.array([d["inference_last_s"] for d in ds if d["mode"] == "POLICY"])
    # per-tick cost of the ticks that ran the policy: mode POLICY and one more policy step than the tick
    # before (diagnostics of the previous tick present), so each sample includes onnxruntime
    by_tick = {d["ticks"]: d for d in ds}
    policy_ticks = [d for d in ds if d["mode"] == "POLICY" and d["ticks"] - 1 in by_tick]
    ran = [d for d in policy_ticks if d["policy_steps"] == by_tick[d["ticks"] - 1]["policy_steps"] + 1]
    tick_cost = np.array([d["tick_cost_s"] for d in ran])
    modes: dict[str, int] = {}
    for d in ds:
        modes[d["mode"]] = modes.get(d["mode"], 0) + 1
    sent = {d["ticks"]: d["joint_state_sent_ns"] for d in ds}
    # ticks run by a joint state's arrival (sensor trigger): one more sensor tick than the tick before
    on_js = {k for k, d in by_tick.items() if k - 1 in by_tick
             and d.get("sensor_ticks", 0) == by_tick[k - 1].get("sensor_ticks", 0) + 1}
    latency, latency_on_js, hop, cmd_sent = [], [], [], {}
    for seq, recv_ns, src_ns in list(probe.cmds):
        cmd_sent[seq] = src_ns
        if seq in sent and sent[seq] > 0:
            latency.append((recv_ns - sent[seq]) * 1e-9)
            hop.append((recv_ns - src_ns) * 1e-9)
            if seq in on_js:
                latency_on_js.append(latency[-1])
    # the longest period, and the bridge's longest publish gap overlapping it: both processes stalled at
    # once (different scheduling classes) points at the machine rather than at the node
    js_gap = np.diff(js_sent) * 1e-9  # [N-1] s
    overlap = None
    if len(ds):
        k = ds[int(period.argmax())]["ticks"]
        if k in cmd_sent and k - 1 in cmd_sent and js_gap.size:
            a, b = cmd_sent[k - 1], cmd_sent[k]
            hit = (js_sent[:-1] < b) & (js_sent[1:] > a)
            overlap = round(float(js_gap[hit].max()) * 1e3, 3) if hit.any() else 0.0
    timer = trigger == "timer"  # lateness and skipped periods belong to the timer, which drives only timer runs
    return {
        "rate_hz": rate, "trigger": trigger, "window_s": round(wall, 2), "ticks_expected": round(wall * rate),
        "ticks_executed": k1 - k0, "samples": len(ds), "diagnostics_missing": (k1 - k0) - len(ds),
        "ticks_by_sensor": d1.get("sensor_ticks", 0) - d0.get("sensor_ticks", 0),
        "ticks_dropped": d1["ticks_skipped"] - d0["ticks_skipped"] if timer else None,
        "ticks_late": int((late > LATE_S).sum()) if timer else None,
        "ticks_not_in_policy": len(ds) - modes.get("POLICY", 0),
        "policy_steps": d1["policy_steps"] - d0["policy_steps"],
        "tick_cost_us": pct(tick_cost, 1e6), "tick_cost_samples": len(ran),
        "policy_ticks_without_inference": len(policy_ticks) - len(ran),
        "tick_cost_max_us_node": round(d1["tick_cost_max_s"] * 1e6, 1),
        "ticks_sensor_older_than_2_periods": int((age > 2 * nominal).sum()),
        "modes": modes, "period_mean_ms": round(float(period.mean()) * 1e3, 4) if len(ds) else None,
        "jitter_ms": pct(np.abs(period - nominal)), "lateness_ms": pct(late) if timer else pct([]),
        "sensor_age_ms": pct(age),
        "latency_ms": pct(latency), "latency_samples": len(latency),
        "latency_ms_ticks_by_joint_state": pct(latency_on_js), "command_dds_hop_ms": pct(hop),
        "inference_ms": pct(inference), "longest_period_ms": pct(period)["max"],
        "bridge_gap_during_longest_period_ms": overlap,
        "bridge_jitter_ms": pct(np.abs(js_gap - BRIDGE_PERIOD)), "bridge_gap_max_ms": pct(js_gap)["max"],
        "joint_states_hz": round((d1["joint_states_received"] - d0["joint_states_received"]) / wall, 1),
        "rejected": d1.get("rejected", {}),
    }


def fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def count(x) -> str:
    return "-" if x is None else str(x)


def report_line(r: dict) -> str:
    j, lat, age, inf, tc = r["jitter_ms"], r["latency_ms"], r["sensor_age_ms"], r["inference_ms"], r["tick_cost_us"]
    left = f" | final mode {r['final_mode']}: {r['final_reason']}" if r["final_mode"] != "POLICY" else ""
    by = ""
    if r["trigger"] == "sensor":
        js = r["latency_ms_ticks_by_joint_state"]
        by = (f", by joint state {r['ticks_by_sensor']} (their latency p50 {fmt(js['p50'], 2)} p99 "
              f"{fmt(js['p99'], 2)} ms)")
    return (f"{r['rate_hz']:>4d} Hz {r['trigger']:6s} {r['sched']:8s} jitter p50 {fmt(j['p50'])} p99 {fmt(j['p99'])} "
            f"max {fmt(j['max'])} ms | latency p50 {fmt(lat['p50'], 2)} p99 {fmt(lat['p99'], 2)} "
            f"max {fmt(lat['max'], 2)} ms (sensor age p50 {fmt(age['p50'], 2)} p99 {fmt(age['p99'], 2)}) | "
            f"tick cost p50 {fmt(tc['p50'], 0)} p99 {fmt(tc['p99'], 0)} max {fmt(tc['max'], 0)} us "
            f"({r['tick_cost_samples']} POLICY ticks with inference, {r['policy_ticks_without_inference']} without) | "
            f"inference p99 {fmt(inf['p99'])} ms | {r['samples']} ticks{by}, late {count(r['ticks_late'])}, "
            f"dropped {count(r['ticks_dropped'])}, not in POLICY {r['ticks_not_in_policy']}, sensor older than 2 "
            f"periods {r['ticks_sensor_older_than_2_periods']} | cpu node {r['cpu_policy_node']:.2f} "
            f"bridge {r['cpu_sim_bridge']:.2f} | bridge jitter p99 {fmt(r['bridge_jitter_ms']['p99'])} ms, "
            f"max gap {fmt(r['bridge_gap_max_ms'], 1)} ms (during the node's longest period "
            f"{fmt(r['longest_period_ms'], 1)} ms: {fmt(r['bridge_gap_during_longest_period_ms'], 1)} ms) | "
            f"{r['realtime']}{left}")


def parse_runs(text: str) -> list[tuple[int, str]]:
    """'50:timer,200:sensor' -> [(50, 'timer'), (200, 'sensor')]; ValueError naming the bad item."""
    runs = []
    for item in text.split(","):
        rate, _, trigger = item.strip().partition(":")
        if not rate.isdigit() or int(rate) not in SPECS or trigger not in TRIGGERS:
            raise ValueError(f"--runs item '{item}': expected RATE:TRIGGER with RATE in {sorted(SPECS)} and TRIGGER "
                             f"in {list(TRIGGERS)}, e.g. {DEFAULT_RUNS}")
        runs.append((int(rate), trigger))
    return runs


def goal_text(value, goal: float, unit: str) -> str:
    if value is None:
        return f"- (goal <= {goal:g} {unit}: not measured)"
    verdict = "met" if value <= goal else f"MISSED by {value - goal:.3g} {unit} ({value / goal:.1f}x the goal)"
    return f"{value:g} {unit} (goal <= {goal:g} {unit}: {verdict})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="at most ~60 s: 3 s per (rate, trigger, scheduling)")
    p.add_argument("--seconds", type=float, default=None,
                   help="measured seconds per (rate, trigger, scheduling); default 60")
    p.add_argument("--runs", default=DEFAULT_RUNS, help="RATE:TRIGGER pairs to measure, rate 50 or 200, trigger "
                                                        "timer or sensor")
    p.add_argument("--sched", default="normal,realtime", help="node scheduling: normal and/or realtime")
    p.add_argument("--sensor-timeout", type=float, default=SENSOR_TIMEOUT,
                   help="the node's watchdog in s (its own default is 2 control periods)")
    p.add_argument("--keep-logs", action="store_true", help="keep the nodes' logs (printed path)")
    a = p.parse_args()
    seconds = a.seconds or (3.0 if a.quick else 60.0)
    try:
        runs = parse_runs(a.runs)
    except ValueError as e:
        p.error(str(e))
    rates = sorted({rate for rate, _ in runs})
    scheds = a.sched.split(",")
    if set(scheds) - {"normal", "realtime"}:
        p.error("--sched from normal,realtime")
    t_start = time.monotonic()

    tmp = Path(tempfile.mkdtemp(prefix="s2r_ros_loop_"))
    domain = 30 + os.getpid() % 60  # private DDS domain (tests use 100-199, s2r ros sim 150-229)
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
           "PYTHONUNBUFFERED": "1"}
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    bridge_log = tmp / "sim_bridge.log"
    bridge = launch("s2r.ros.sim_bridge", {"robot_spec": BRIDGE_SPEC, "gantry": "true"}, env, bridge_log)
    probe = None
    results, errors, policies = [], [], {}
    try:
        for rate in rates:  # while the bridge starts
            policies[rate] = export_policy(SPECS[rate], tmp / f"policy_{rate}hz.onnx")
        probe = Probe(domain)
        print(f"sim bridge pid {bridge.pid}, ROS_DOMAIN_ID {domain}, {seconds:g} s per run, logs in {tmp}")
        for sched in scheds:  # interleaved: each scheduling sees every (rate, trigger) before the next
            for rate, trigger in runs:
                if bridge.poll() is not None:
                    raise RuntimeError(f"the sim bridge exited (code {bridge.returncode}):\n{tail(bridge_log)}")
                try:
                    r = measure(probe, rate, trigger, sched, tmp / f"policy_{rate}hz.onnx", seconds,
                                a.sensor_timeout, env, tmp, bridge)
                except (RuntimeError, TimeoutError) as e:  # report it, go on with the other runs
                    print(f"{rate:>4d} Hz {trigger:6s} {sched:8s} FAILED: {e}", flush=True)
                    errors.append({"rate_hz": rate, "trigger": trigger, "sched": sched, "error": str(e)[:2000]})
                    continue
                results.append(r)
                print(report_line(r), flush=True)
    finally:
        if probe is not None:
            probe.close()
        stop(bridge)
    if not a.keep_logs:
        for log in tmp.iterdir():
            log.unlink()
        tmp.rmdir()

    def run_of(rate: int, sched: str, trigger: str = "timer") -> dict | None:
        return next((r for r in results if r["rate_hz"] == rate and r["sched"] == sched and r["trigger"] == trigger),
                    None)

    def headline(rate: int, trigger: str = "timer") -> dict | None:
        """The realtime run where SCHED_FIFO was granted, else the normal one."""
        rt = run_of(rate, "realtime", trigger)
        return rt if rt is not None and rt["realtime"].startswith("SCHED_FIFO") else run_of(rate, "normal", trigger)

    print(f"\n{'rate':>5s} {'trigger':7s} {'sched':8s} {'jitter p50':>10s} {'p99':>7s} {'max':>7s} "
          f"{'latency p50':>11s} {'p99':>7s} {'max':>7s} {'tick p50':>8s} {'p99':>5s} {'infer p99':>9s} "
          f"{'ticks':>6s} {'late':>5s} {'drop':>5s} {'!POLICY':>7s} {'cpu':>5s}   (ms; tick cost in us; cpu in cores)")
    for r in results:
        j, lat, tc = r["jitter_ms"], r["latency_ms"], r["tick_cost_us"]
        print(f"{r['rate_hz']:>5d} {r['trigger']:7s} {r['sched']:8s} {fmt(j['p50']):>10s} {fmt(j['p99']):>7s} "
              f"{fmt(j['max']):>7s} {fmt(lat['p50'], 2):>11s} {fmt(lat['p99'], 2):>7s} {fmt(lat['max'], 2):>7s} "
              f"{fmt(tc['p50'], 0):>8s} {fmt(tc['p99'], 0):>5s} {fmt(r['inference_ms']['p99']):>9s} "
              f"{r['samples']:6d} {count(r['ticks_late']):>5s} {count(r['ticks_dropped']):>5s} "
              f"{r['ticks_not_in_policy']:7d} {r['cpu_policy_node']:5.2f}")
    head, head_sensor = headline(200), headline(200, "sensor")
    head_p99 = head["jitter_ms"]["p99"] if head else None
    sensor_p99 = head_sensor["latency_ms"]["p99"] if head_sensor else None
    tick_p99 = head["tick_cost_us"]["p99"] if head else None
    print(f"\n200 Hz headlines (SCHED_FIFO run where granted, else normal):\n"
          f"  jitter p99, timer trigger ({head['sched'] if head else '-'}): {goal_text(head_p99, GOAL_P99_MS, 'ms')}\n"
          f"  latency p99, sensor trigger ({head_sensor['sched'] if head_sensor else '-'}): "
          f"{goal_text(sensor_p99, GOAL_LATENCY_SENSOR_P99_MS, 'ms')}\n"
          f"  tick cost p99 in POLICY, timer trigger ({head['sched'] if head else '-'}): "
          f"{goal_text(tick_p99, GOAL_TICK_P99_US, 'us')}")
    p99_of = {f"jitter_p99_ms_{rate}hz_{sched}": run["jitter_ms"]["p99"]
              for rate in rates for sched in scheds if (run := run_of(rate, sched)) is not None}
    sensor_of = {f"latency_p99_ms_{rate}hz_{sched}_sensor": run["latency_ms"]["p99"]
                 for rate in rates for sched in scheds if (run := run_of(rate, sched, "sensor")) is not None}
    result = {"bench": "ros_loop", "quick": a.quick, "seconds_per_run": seconds, "rates_hz": rates,
              "runs_measured": [f"{rate}:{trigger}" for rate, trigger in runs], "sched": scheds,
              "settings": {"transport": "FastDDS, loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST)",
                           "executor": "rclpy SingleThreadedExecutor (spin_node)", "sim_bridge_state_hz": 200,
                           "sim_bridge_sched": "normal", "gantry": True, "ramp_time_s": RAMP_TIME,
                           "sensor_timeout_s": a.sensor_timeout, "warmup_s": WARMUP_S,
                           "late_threshold_ms": LATE_S * 1e3, "policy": policies},
              "runs": results, "errors": errors,
              "jitter_p99_ms_200hz": head_p99, "jitter_p99_goal_ms": GOAL_P99_MS,
              "headline_sched": head["sched"] if head else None,
              "jitter_p99_meets_goal": head_p99 is not None and head_p99 <= GOAL_P99_MS,
              "latency_p99_ms_200hz": head["latency_ms"]["p99"] if head else None, **p99_of,
              "latency_p99_ms_200hz_sensor": sensor_p99,
              "latency_p99_ms_200hz_sensor_goal_ms": GOAL_LATENCY_SENSOR_P99_MS,
              "latency_p99_ms_200hz_sensor_sched": head_sensor["sched"] if head_sensor else None,
              "latency_p99_200hz_sensor_meets_goal":
                  sensor_p99 is not None and sensor_p99 <= GOAL_LATENCY_SENSOR_P99_MS,
              **sensor_of,
              "tick_p99_us": tick_p99, "tick_p50_us": head["tick_cost_us"]["p50"] if head else None,
              "tick_p99_goal_us": GOAL_TICK_P99_US,
              "tick_p99_meets_goal": tick_p99 is not None and tick_p99 <= GOAL_TICK_P99_US,
              "wall_s": round(time.monotonic() - t_start, 1),
              "machine": {**machine_info(), "onnxruntime": onnxruntime.__version__, "rclpy": version("rclpy"),
                          "rmw": get_rmw_implementation_identifier(), "load_avg_1m": round(os.getloadavg()[0], 2)}}
    print(json.dumps(result))

if __name__ == "__main__":
    main()

"""The policy node's per-tick cost, in one process, by part: what the robot computer pays per control tick.

    python bench/node_tick.py [--quick] [--ticks N] [--policy PATH] [--spec PATH]

Builds the real `PolicyNode` (G1 spec and the shipped g1_stand.onnx by default; Panda + panda_reach.onnx
with --spec panda/panda.yaml --policy ...), feeds it a still robot at the default pose (joint states and,
for the G1, an upright IMU, written into the node as its subscriptions would), takes it to POLICY with the
real state machine, and calls its tick directly — no DDS, no executor — in two regimes:

    back-to-back   ticks one after another (hot caches: the cost of the code)
    paced          one tick every 1/rate_hz with a sleep between (what a 200 Hz or 50 Hz loop sees:
                   on a shared VM the core is cold again at every tick)

and reports the node's own `tick_cost_s` (observation + inference + action + safety filter) p50/p99, plus
the p50 of each part timed separately on the same inputs (terms, frame+history, onnxruntime, action,
safety filter). The last line is one JSON object with `tick_p99_us_paced` and `tick_p99_us_hot`.
Goal (issue #9): tick p99 <= 100 us for the 3x256-class policy on this CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="at most ~20 s")
    ap.add_argument("--ticks", type=int, default=5000)
    ap.add_argument("--rate-hz", type=float, default=200.0, help="paced regime's tick rate")
    ap.add_argument("--policy", default=os.path.join(ROOT, "policies", "pretrained", "g1_stand.onnx"))
    ap.add_argument("--spec", default=os.path.join(ROOT, "sim", "robots", "g1", "g1.yaml"))
    args = ap.parse_args()
    ticks = 1000 if args.quick else args.ticks

    import rclpy
    from rclpy.parameter import Parameter

    from s2r.control.safety import Mode
    from s2r.ros.policy_node import PolicyNode, resolve_spec

    spec_path = args.spec if os.path.isfile(args.spec) else str(resolve_spec(args.spec).source)
    rclpy.init(domain_id=205 + os.getpid() % 20)  # DDS domain ids stop at 232
    node = PolicyNode(parameter_overrides=[
        Parameter("policy_path", value=args.policy), Parameter("robot_spec", value=spec_path),
        Parameter("ramp_time", value=0.05), Parameter("sensor_timeout", value=1e6)])
    node.timer.cancel()
    node.watchdog.cancel()
    spec = node.spec
    node.q, node.qd = np.array(spec.array("default"), dtype=np.float64), np.zeros(spec.num_joints)
    if node.finger_names:
        node.fingers = np.full(len(node.finger_names), 0.04)
    if node.ik is not None:
        node.goal = np.array([0.5, 0.0, 0.3])

    def fresh():
        node.joint_stamp = node.imu_stamp = time.monotonic()

    fresh()
    for _ in range(3):
        node._tick()
    assert node.safety.start_ramp(), node.safety.reason
    for _ in range(40):
        fresh()
        node._tick()
        time.sleep(0.003)
    tr = node._start_policy()
    assert tr, tr.reason

    def run(paced: bool) -> np.ndarray:
        costs = np.empty(ticks)
        period = 1.0 / args.rate_hz
        gc.disable()
        for i in range(ticks):
            fresh()
            steps = node.policy_steps
            node._tick()
            assert node.safety.mode is Mode.POLICY and node.policy_steps == steps + 1, node.safety.reason
            costs[i] = node.tick_cost
            if paced:
                time.sleep(period)
        gc.enable()
        return costs * 1e6

    hot, paced = run(False), run(True)

    # the parts, hot, on the same inputs (what one tick does, piece by piece)
    def p50(fn, n=min(ticks, 2000)) -> float:
        t = np.empty(n)
        for i in range(n):
            t0 = time.perf_counter_ns()
            fn()
            t[i] = time.perf_counter_ns() - t0
        return float(np.percentile(t, 50) / 1e3)

    terms = node._observe()
    frame = node.obs.frame(terms)
    obs = node.obs.push(frame)[0]
    a = node.last_action[None].astype(np.float64)
    targets = node.proc.joint_targets(a)[0] if node.ik is None else node.q.copy()
    g = node.last_terms.get("projected_gravity")
    now = time.monotonic()
    parts = {"terms": p50(node._observe), "frame_history": p50(lambda: node.obs.push(node.obs.frame(terms))),
             "onnxruntime": p50(lambda: node.policy(obs)),
             "action": p50(lambda: node.proc.joint_targets(a)) if node.ik is None else
             p50(lambda: node.ik.joint_targets(a, *node._fk[:2], node.ee_quat_hold, *node._fk[2:])),
             "safety_filter": p50(lambda: node.safety.filter(now, targets, node.q, node.qd, last_sensor_time=now,
                                                             projected_gravity=g))}
    node.destroy_node()
    rclpy.shutdown()

    from s2r.bench_util import machine_info

    pct = lambda x, q: round(float(np.percentile(x, q)), 1)  # noqa: E731
    res = {"bench": "node_tick", "spec": spec.name, "policy": os.path.basename(args.policy), "ticks": ticks,
           "rate_hz_paced": args.rate_hz, "tick_p50_us_hot": pct(hot, 50), "tick_p99_us_hot": pct(hot, 99),
           "tick_p50_us_paced": pct(paced, 50), "tick_p99_us_paced": pct(paced, 99),
           "parts_p50_us_hot": {k: round(v, 1) for k, v in parts.items()}, "goal_tick_p99_us": 100.0,
           "machine": machine_info(), "date": time.strftime("%Y-%m-%d")}
    print(f"{spec.name} / {res['policy']}: tick cost hot p50 {res['tick_p50_us_hot']} us, p99 "
          f"{res['tick_p99_us_hot']} us; paced at {args.rate_hz:g} Hz p50 {res['tick_p50_us_paced']} us, p99 "
          f"{res['tick_p99_us_paced']} us (goal p99 <= 100 us)")
    print("parts (hot p50, us): " + ", ".join(f"{k} {v:.1f}" for k, v in res["parts_p50_us_hot"].items()))
    print(json.dumps(res))


if __name__ == "__main__":
    main()

"""Simulation throughput benchmark: s2r batched API vs gymnasium vector envs vs raw mujoco.rollout.

    python bench/sim_throughput.py [--quick] [--envs 1,16,64,256]

Prints one line per env count, then one JSON object as the last line (see s2r/bench_sim.py).
"""

import argparse
import json
import sys

from s2r.bench_sim import run

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="at most ~60 s: 16 and 64 envs, short windows")
    p.add_argument("--envs", default="1,16,64,256", help="comma-separated env counts")
    a = p.parse_args()
    try:
        counts = [int(x) for x in a.envs.split(",") if x.strip()]
        assert counts and min(counts) > 0
    except (ValueError, AssertionError):
        sys.exit(f"error: --envs must be comma-separated positive integers, got '{a.envs}'")
    print(json.dumps(run(counts, quick=a.quick)))

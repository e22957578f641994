"""bench/ scripts' bookkeeping (their measurements run in bench/, not here)."""

import importlib.util
import json
import os
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_learning_bench_reuses_finished_runs_and_skips_runs_claimed_by_a_live_invocation(tmp_path):
    lb = load("learning")
    job = dict(task="Hopper-v5", method="sac", seed=1, steps=20000, scale=1.0, out=str(tmp_path))
    path = lb.job_path(tmp_path, job)
    assert path.name == "Hopper-v5__sac__s1__x1__20000.json"
    path.parent.mkdir(parents=True)
    # claimed by a live process (this one): another invocation leaves it alone
    path.with_suffix(".running").write_text(str(os.getpid()))
    assert lb.run_cached(job) is None
    # finished: the stored result comes back without training
    done = {**job, "curve": [[20000, 312.5]], "final": 312.5, "wall_s": 1.0}
    path.write_text(json.dumps(done))
    assert lb.run_cached(job) == done

# s2r: two commands for users (README quick start): `make demo` and `make test`.
# Both bootstrap .venv when missing. GPU users pick their own torch build:
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" demo
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= train,dev,ros
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s2r-installed
PYTEST_ARGS ?=
DEMO_OUT ?= out/demo

.PHONY: bootstrap demo test bench clean system-deps isaac test-isaac

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@bash scripts/system_deps.sh
	@touch $(STAMP)

bootstrap: $(STAMP)

# The main job on the CPU default: simulate, then train -> export -> run the policy through ROS 2.
DEMO_STEPS ?= 100000
HAVE_ROS = $(shell $(PY) -c "import rclpy, sensor_msgs.msg, std_srvs.srv" >/dev/null 2>&1 && echo yes)
demo: $(STAMP)
	MUJOCO_GL=egl $(VENV)/bin/s2r sim info humanoid-walk
	MUJOCO_GL=egl $(VENV)/bin/s2r sim play humanoid-walk --steps 150 --video $(DEMO_OUT)/humanoid_walk.mp4 --plot $(DEMO_OUT)/humanoid_walk.png
	MUJOCO_GL=egl $(VENV)/bin/s2r sim play arm-pick --policy scripted --steps 300 --num-envs 2 --no-randomize --video $(DEMO_OUT)/arm_pick.mp4
	rm -rf $(DEMO_OUT)/stand-run
	$(VENV)/bin/s2r train --task humanoid-stand --algo sac --steps $(DEMO_STEPS) --eval-every 50000 --out $(DEMO_OUT)/stand-run
	$(VENV)/bin/s2r export $(DEMO_OUT)/stand-run --out $(DEMO_OUT)/stand.onnx
	@echo "--- a short corrected session: a scripted operator at a simulated gamepad corrects a weak arm-pick policy, RLPD learns"
	$(PY) bench/hil.py --quick --out $(DEMO_OUT)/hil
ifeq ($(HAVE_ROS),yes)
	@echo "--- ROS 2 sim-to-sim: the policy trained just now ($(DEMO_STEPS) steps) drives the sim bridge over DDS"
	MUJOCO_GL=egl $(VENV)/bin/s2r ros sim $(DEMO_OUT)/stand.onnx --seconds 10 --video $(DEMO_OUT)/ros_sim_demo_policy.mp4 --out $(DEMO_OUT)/ros_sim_demo_policy.json
	@echo "--- ROS 2 sim-to-sim: the shipped standing policy (policies/pretrained/g1_stand.onnx)"
	MUJOCO_GL=egl $(VENV)/bin/s2r ros sim policies/pretrained/g1_stand.onnx --seconds 10 --video $(DEMO_OUT)/ros_sim_pretrained.mp4 --out $(DEMO_OUT)/ros_sim_pretrained.json
	@echo "--- ROS 2 sim-to-sim: the shipped arm policy (policies/pretrained/panda_reach.onnx) reaches four goals on /goal_pose"
	MUJOCO_GL=egl $(VENV)/bin/s2r ros sim policies/pretrained/panda_reach.onnx --spec panda/panda.yaml --video $(DEMO_OUT)/ros_sim_arm.mp4 --out $(DEMO_OUT)/ros_sim_arm.json
else
	@echo "--- ROS 2 (rclpy) is not installed in $(VENV): skipping the ROS 2 sim-to-sim loop."
	@echo "    Install it with: $(PY) -m pip install -e '.[ros]'   (or make EXTRAS=train,dev,ros demo)"
endif
	@echo "demo outputs in $(DEMO_OUT)/"

# Whole suite. pytest exits 5 when it collects nothing: that is a failure here too.
test: $(STAMP)
	MUJOCO_GL=egl $(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks need the comparison peers (stable-baselines3): the `bench` extra.
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/sim_throughput.py
	$(PY) bench/train_speed.py
	$(PY) bench/inference_latency.py
	$(PY) bench/ros_loop.py

# Isaac Lab 3.0 (kit-less: Newton physics, MuJoCo Warp solver) as a simulator for s2r's
# algorithms (docs/ISAAC.md). Its own venv: isaaclab needs Python 3.12 and pins torch 2.11.0.
# The first Python 3.12 that runs (a pyenv shim may exist without the version selected).
PYTHON312 ?= $(shell for c in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python; do $$c -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { command -v $$c; break; }; done)
ISAAC_VENV ?= .venv-isaac
ISAAC_TORCH_SPEC ?= torch==2.11.0
ISAACLAB_SPEC ?= isaaclab==3.0.0
ISAAC_PY := $(ISAAC_VENV)/bin/python
ISAAC_STAMP := $(ISAAC_VENV)/.s2r-installed

$(ISAAC_STAMP): pyproject.toml Makefile
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found; set PYTHON312=/path/to/python3.12 (isaaclab 3.0 needs >=3.12,<3.13)"; exit 1; }
	@test -x $(ISAAC_PY) || $(PYTHON312) -m venv $(ISAAC_VENV)
	$(ISAAC_PY) -m pip install -q --upgrade pip
	$(ISAAC_PY) -m pip install -q $(ISAAC_TORCH_SPEC)
	$(ISAAC_PY) -m pip install -q $(ISAACLAB_SPEC) $(ISAAC_TORCH_SPEC)
	$(ISAAC_PY) -m pip install -q -e ".[train]" "pytest>=8" "hypothesis>=6.100" $(ISAAC_TORCH_SPEC)
	@touch $(ISAAC_STAMP)

isaac: $(ISAAC_STAMP)

# The Isaac Lab tests only (tests/test_isaaclab.py, tests/test_isaaclab_g1.py, marker `isaaclab`); offline, on the CPU.
test-isaac: $(ISAAC_STAMP)
	$(ISAAC_PY) -m pytest -m isaaclab tests/test_isaaclab.py tests/test_isaaclab_g1.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache

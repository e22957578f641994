"""s2r's own G1-class biped (sim/robots/g1) as an Isaac Lab 3.0 asset and a standing task, kit-less.

    s2r train --task isaaclab:Isaac-S2R-G1-Stand --algo sac        (in .venv-isaac)

The asset is sim/isaac_assets/g1.usda, converted from sim/robots/g1/g1.xml by
sim/isaac_assets/mjcf_to_usd.py (NVIDIA's mujoco-usd-converter; Isaac Lab's own MJCF importer needs
Isaac Sim's `isaacsim.asset.importer.mjcf`, not installable next to isaaclab 3.0.0). Joints, default
pose, PD gains (Isaac Lab implicit actuators), torque and velocity limits come from
sim/robots/g1/g1.yaml, so the Isaac Lab robot and s2r's spec agree by construction.

Importing this module registers the task with gymnasium (the adapter, sim/isaaclab.py, imports it
with isaaclab_tasks). Isaac Lab is imported here at module level: import it only where Isaac Lab is
installed.
"""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium
import yaml
from isaaclab_newton.physics import MJWarpSolverCfg, NewtonCfg
from isaaclab_newton.sim.schemas import NewtonArticulationCfg

import isaaclab.envs.mdp as mdp
import isaaclab.sim as sim_utils
from isaaclab.actuators import ImplicitActuatorCfg
from isaaclab.assets import ArticulationCfg, AssetBaseCfg
from isaaclab.envs import ManagerBasedRLEnvCfg
from isaaclab.managers import EventTermCfg as EventTerm
from isaaclab.managers import ObservationGroupCfg as ObsGroup
from isaaclab.managers import ObservationTermCfg as ObsTerm
from isaaclab.managers import RewardTermCfg as RewTerm
from isaaclab.managers import TerminationTermCfg as DoneTerm
from isaaclab.scene import InteractiveSceneCfg
from isaaclab.utils import configclass
from isaaclab_tasks.utils import PresetCfg

G1_USD = Path(__file__).parent / "isaac_assets" / "g1.usda"
G1_SPEC = Path(__file__).parent / "robots" / "g1" / "g1.yaml"
G1_BASE_HEIGHT = 0.793  # pelvis height of g1.xml's body pos (the `home` keyframe has 0.78)
TASK_ID = "Isaac-S2R-G1-Stand"

_spec = yaml.safe_load(G1_SPEC.read_text())
G1_JOINTS = [j["name"] for j in _spec["joints"]]  # the spec's (= the USD's) joint order

G1_CFG = ArticulationCfg(
    spawn=sim_utils.UsdFileCfg(
        usd_path=str(G1_USD),
        articulation_props=NewtonArticulationCfg(self_collision_enabled=False),
    ),
    init_state=ArticulationCfg.InitialStateCfg(
        pos=(0.0, 0.0, G1_BASE_HEIGHT), joint_pos={j["name"]: j["default"] for j in _spec["joints"]}),
    # one implicit PD per joint, gains and limits as in g1.yaml (and g1.xml's position actuators)
    actuators={j["name"]: ImplicitActuatorCfg(
        joint_names_expr=[j["name"]], stiffness=j["kp"], damping=j["kd"],
        effort_limit_sim=j["torque_limit"], velocity_limit_sim=j["velocity_limit"]) for j in _spec["joints"]},
)


@configclass
class G1PhysicsCfg(PresetCfg):
    """Newton + MuJoCo Warp with g1.xml's solver options (implicitfast, 10 / 20 iterations)."""

    newton_mjwarp: NewtonCfg = NewtonCfg(
        solver_cfg=MJWarpSolverCfg(njmax=100, nconmax=50, iterations=10, ls_iterations=20,
                                   integrator="implicitfast", cone="pyramidal", impratio=1.0),
        num_substeps=1,
        use_cuda_graph=True,
    )
    default: NewtonCfg = newton_mjwarp


@configclass
class G1SceneCfg(InteractiveSceneCfg):
    ground = AssetBaseCfg(prim_path="/World/ground", spawn=sim_utils.GroundPlaneCfg(size=(100.0, 100.0)))
    robot: ArticulationCfg = G1_CFG.replace(prim_path="{ENV_REGEX_NS}/Robot")


@configclass
class ActionsCfg:
    joint_pos = mdp.JointPositionActionCfg(asset_name="robot", joint_names=G1_JOINTS, preserve_order=True,
                                           scale=_spec["action"]["scale"], use_default_offset=True)


@configclass
class ObservationsCfg:
    @configclass
    class PolicyCfg(ObsGroup):  # g1.yaml's terms less the velocity command (standing has none)
        base_ang_vel = ObsTerm(func=mdp.base_ang_vel, scale=0.25)
        projected_gravity = ObsTerm(func=mdp.projected_gravity)
        joint_pos = ObsTerm(func=mdp.joint_pos_rel)  # all joints, in the USD's order = g1.yaml's order
        joint_vel = ObsTerm(func=mdp.joint_vel_rel, scale=0.05)
        last_action = ObsTerm(func=mdp.last_action)

        def __post_init__(self):
            self.enable_corruption = False
            self.concatenate_terms = True

    policy: PolicyCfg = PolicyCfg()


@configclass
class EventCfg:
    reset_base = EventTerm(func=mdp.reset_root_state_uniform, mode="reset",
                           params={"pose_range": {"x": (-0.1, 0.1), "y": (-0.1, 0.1), "yaw": (-math.pi, math.pi)},
                                   "velocity_range": {}})
    reset_joints = EventTerm(func=mdp.reset_joints_by_offset, mode="reset",
                             params={"position_range": (-0.05, 0.05), "velocity_range": (0.0, 0.0)})


@configclass
class RewardsCfg:
    alive = RewTerm(func=mdp.is_alive, weight=1.0)
    terminating = RewTerm(func=mdp.is_terminated, weight=-10.0)
    base_height = RewTerm(func=mdp.base_height_l2, weight=-50.0, params={"target_height": 0.76})
    flat_orientation = RewTerm(func=mdp.flat_orientation_l2, weight=-2.0)
    joint_deviation = RewTerm(func=mdp.joint_deviation_l1, weight=-0.1)
    action_rate = RewTerm(func=mdp.action_rate_l2, weight=-0.01)


@configclass
class TerminationsCfg:
    time_out = DoneTerm(func=mdp.time_out, time_out=True)
    base_low = DoneTerm(func=mdp.root_height_below_minimum, params={"minimum_height": 0.5})
    tilted = DoneTerm(func=mdp.bad_orientation, params={"limit_angle": 1.0})


@configclass
class G1StandEnvCfg(ManagerBasedRLEnvCfg):
    """Stand at the default pose: 50 Hz control (g1.yaml: physics dt 0.005, decimation 4), 10 s episodes."""

    scene: G1SceneCfg = G1SceneCfg(num_envs=64, env_spacing=2.5)
    observations: ObservationsCfg = ObservationsCfg()
    actions: ActionsCfg = ActionsCfg()
    rewards: RewardsCfg = RewardsCfg()
    terminations: TerminationsCfg = TerminationsCfg()
    events: EventCfg = EventCfg()

    def __post_init__(self):
        self.decimation = int(_spec["decimation"])
        self.episode_length_s = 10.0
        self.sim.dt = float(_spec["physics_dt"])
        self.sim.render_interval = self.decimation
        self.sim.physics = G1PhysicsCfg()


if TASK_ID not in gymnasium.registry:
    gymnasium.register(id=TASK_ID, entry_point="isaaclab.envs:ManagerBasedRLEnv", disable_env_checker=True,
                       kwargs={"env_cfg_entry_point": f"{__name__}:G1StandEnvCfg"})

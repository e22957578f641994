"""The colcon workspace ros_ws/: the ament_python package s2r_ros that makes s2r's nodes ROS packages.

s2r_ros is glue: console scripts that call s2r.ros.*.main, launch files, parameter files. The ROS
`launch` and `launch_ros` packages have no pip wheels, so the launch files cannot run here: they
are read with ast, and run against small stand-ins of the launch API that record the nodes they
would start, following sim.launch.py's include of deploy.launch.py as launch does (the real run is
`ros2 launch` on a ROS 2 install, see ros_ws/README.md).
Everything else is checked for real: package.xml against what s2r/ros imports, setup.py's entry
points against s2r.ros.*.main, each parameter file against the node it configures (built by rclpy
from the file), and, when colcon is installed (`pip install colcon-ros`), a real `colcon build`
whose installed executable is started and stopped as `ros2 run` would.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
import types
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ros_ws" / "src" / "s2r_ros"  # the ament_python package
NAME = "s2r_ros"
LAUNCH_FILES = sorted((PKG / "launch").glob("*.launch.py"))
DEPLOY_LAUNCH, SIM_LAUNCH = PKG / "launch" / "deploy.launch.py", PKG / "launch" / "sim.launch.py"
CONFIG_FILES = sorted((PKG / "config").glob("*.yaml"))
NODE_SOURCES = sorted((ROOT / "s2r" / "ros").glob("*.py"))
# launch arguments each launch file must offer (README, DEPLOY.md), its own or an included file's
REQUIRED_ARGS = {"deploy.launch.py": {"policy_path", "robot_spec", "rate_hz", "controller_name"},
                 "sim.launch.py": {"policy_path", "robot_spec", "rate_hz", "controller_name", "gantry"}}
# console script -> the s2r.ros module whose main it runs (`ros2 run s2r_ros learner` runs s2r.ros.learner_node)
NODE_MODULES = {"policy_node": "policy_node", "sim_bridge": "sim_bridge", "teleop_keyboard": "teleop_keyboard",
                "learner": "learner_node"}
DOMAIN_ID = 215 + os.getpid() % 17  # 215..231: apart from test_ros_nodes' domains, one per process
HAVE_COLCON = all(importlib.util.find_spec(m) is not None for m in ("colcon_core", "colcon_ros"))


def needs_ros():
    pytest.importorskip("rclpy")
    for m in ("std_msgs.msg", "sensor_msgs.msg", "geometry_msgs.msg", "std_srvs.srv"):
        pytest.importorskip(m)


# ---- reading the package ------------------------------------------------------------------------

@functools.cache
def setup_kwargs() -> dict:
    """setup.py's arguments to setup(), evaluated in the package folder as colcon does (setup() is not run)."""
    import setuptools

    recorded: dict = {}
    real_setup, cwd = setuptools.setup, os.getcwd()
    setuptools.setup = lambda **kw: recorded.update(kw)
    try:
        os.chdir(PKG)
        runpy.run_path("setup.py", run_name="__main__")
    finally:
        setuptools.setup = real_setup
        os.chdir(cwd)
    return recorded


def installed_files() -> dict[str, set[str]]:
    """Install folder (relative to the prefix) -> the source files setup.py's data_files put there."""
    out: dict[str, set[str]] = {}
    for dest, sources in setup_kwargs()["data_files"]:
        out.setdefault(dest.rstrip("/"), set()).update(sources)
    return out


def console_scripts() -> dict[str, str]:
    """Executable name -> 'module:function'."""
    entries = setup_kwargs()["entry_points"]["console_scripts"]
    return dict((s.strip() for s in e.split("=", 1)) for e in entries)


def manifest() -> ET.Element:
    return ET.parse(PKG / "package.xml").getroot()


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module a source file imports (at any depth, try blocks included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def ros_packages_imported_by_nodes() -> set[str]:
    """ROS packages s2r/ros needs at run time: rclpy and every package whose .msg/.srv/.action it imports."""
    pkgs = set()
    for path in NODE_SOURCES:
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "rclpy" or (len(parts) > 1 and parts[1] in ("msg", "srv", "action")):
                pkgs.add(parts[0])
    return pkgs


# ---- reading the launch files (ast) ---------------------------------------------------------------

def calls(tree: ast.AST, func: str) -> list[ast.Call]:
    """Every call of `func` (as `func(...)` or `x.func(...)`)."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and ((isinstance(n.func, ast.Name) and n.func.id == func)
                 or (isinstance(n.func, ast.Attribute) and n.func.attr == func))]


def kwarg(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def first_arg(call: ast.Call, keyword: str):
    """The literal first argument of a call, positional or by keyword."""
    expr = call.args[0] if call.args else kwarg(call, keyword)
    return ast.literal_eval(expr)


def file_names(expr: ast.AST, suffix: str, tree: ast.AST | None = None) -> set[str]:
    """File names ending in `suffix` written in an expression (through `x = ...` assignments in `tree`)."""
    names = {n.value for n in ast.walk(expr) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and n.value.endswith(suffix)}
    for var in (n.id for n in ast.walk(expr) if isinstance(n, ast.Name)) if tree is not None else []:
        for a in ast.walk(tree):
            if isinstance(a, ast.Assign) and any(isinstance(t, ast.Name) and t.id == var for t in a.targets):
                names |= file_names(a.value, suffix)
    return names


def included_launch_files(path: Path) -> set[str]:
    """Names of the launch files that `path` includes (PythonLaunchDescriptionSource(...))."""
    tree = ast.parse(path.read_text())
    return {name for c in calls(tree, "PythonLaunchDescriptionSource") for name in file_names(c, ".launch.py", tree)}


def declared_arguments(path: Path, *, with_includes: bool = True) -> set[str]:
    """Launch arguments that `path` declares, and (with_includes) those of the files it includes."""
    declared = {first_arg(c, "name") for c in calls(ast.parse(path.read_text()), "DeclareLaunchArgument")}
    for name in included_launch_files(path) if with_includes else ():
        declared |= declared_arguments(path.parent / name)
    return declared


@dataclass
class LaunchedNode:
    executable: str
    name: str
    configs: set[str]  # parameter files (base names) given to it, directly or through a launch argument


def launched_nodes(path: Path) -> list[LaunchedNode]:
    tree = ast.parse(path.read_text())
    arg_defaults = {first_arg(c, "name"): kwarg(c, "default_value") for c in calls(tree, "DeclareLaunchArgument")}
    nodes = []
    for call in calls(tree, "Node"):
        assert ast.literal_eval(kwarg(call, "package")) == NAME, f"{path.name}: Node(package=...) is not '{NAME}'"
        configs = set()
        for entry in getattr(kwarg(call, "parameters"), "elts", []):
            configs |= file_names(entry, ".yaml")
            for lc in calls(entry, "LaunchConfiguration") if isinstance(entry, ast.Call) else []:
                default = arg_defaults.get(first_arg(lc, "variable_name"))
                configs |= file_names(default, ".yaml", tree) if default is not None else set()
        nodes.append(LaunchedNode(ast.literal_eval(kwarg(call, "executable")),
                                  ast.literal_eval(kwarg(call, "name")), configs))
    return nodes


# ---- package.xml and setup.py -------------------------------------------------------------------

def test_manifest_is_an_ament_python_package_named_like_setup_py_and_the_index_marker():
    root = manifest()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == NAME == setup_kwargs()["name"]
    assert root.findtext("version") == setup_kwargs()["version"]
    assert root.findtext("export/build_type") == "ament_python"
    assert root.findtext("license") == "Apache-2.0"
    assert (PKG / "resource" / NAME).is_file(), "the ament index marker resource/s2r_ros is missing"


def test_every_ros_package_the_nodes_and_launch_files_import_is_an_exec_depend():
    depends = {e.text for e in manifest().iter("exec_depend")} | {e.text for e in manifest().iter("depend")}
    needed = ros_packages_imported_by_nodes()
    assert {"rclpy", "sensor_msgs", "std_srvs"} <= needed  # the scan itself works
    for path in LAUNCH_FILES:  # launch, launch_ros, ament_index_python
        needed |= {m.split(".")[0] for m in imported_modules(path)} - set(sys.stdlib_module_names)
    assert needed - depends == set(), f"package.xml lacks <exec_depend> for {sorted(needed - depends)}"


def test_setup_py_installs_the_marker_manifest_launch_and_config_files():
    files = installed_files()
    assert files["share/ament_index/resource_index/packages"] == {f"resource/{NAME}"}
    assert "package.xml" in files[f"share/{NAME}"]
    assert files[f"share/{NAME}/launch"] == {f"launch/{p.name}" for p in LAUNCH_FILES} != set()
    assert files[f"share/{NAME}/config"] == {f"config/{p.name}" for p in CONFIG_FILES} != set()


def test_setup_cfg_puts_the_scripts_where_ros2_run_looks():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(PKG / "setup.cfg")
    assert cfg["develop"]["script_dir"] == f"$base/lib/{NAME}"
    assert cfg["install"]["install_scripts"] == f"$base/lib/{NAME}"


def test_console_scripts_are_the_s2r_node_mains(monkeypatch):
    needs_ros()
    scripts = console_scripts()
    assert set(scripts) == set(NODE_MODULES)
    monkeypatch.syspath_prepend(str(PKG))
    for script, target in scripts.items():
        assert target == f"{NAME}.{script}:main", f"console script {script} -> {target}"
        module, func = target.split(":")
        glue = importlib.import_module(module)
        assert Path(glue.__file__).resolve().is_relative_to(PKG), f"{module} imported from {glue.__file__}"
        node_module = importlib.import_module(f"s2r.ros.{NODE_MODULES[script]}")
        assert getattr(glue, func) is node_module.main, f"console script {script} -> {target}"


# ---- launch files (ast) ---------------------------------------------------------------------------

def test_there_is_a_deploy_and_a_sim_launch_file():
    assert {p.name for p in LAUNCH_FILES} == set(REQUIRED_ARGS)


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_starts_console_scripts_of_this_package(path):
    nodes = launched_nodes(path)
    assert nodes, f"{path.name} starts no Node"
    for node in nodes:
        assert node.executable in console_scripts(), \
            f"{path.name}: executable '{node.executable}' is not a console script {sorted(console_scripts())}"


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_declares_every_argument_it_uses(path):
    declared = declared_arguments(path, with_includes=False)  # an included file's are set only when it runs
    used = {first_arg(c, "variable_name") for c in calls(ast.parse(path.read_text()), "LaunchConfiguration")}
    assert used - declared == set(), f"{path.name} uses undeclared launch arguments {sorted(used - declared)}"


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_offers_the_documented_arguments_itself_or_through_an_include(path):
    missing = REQUIRED_ARGS[path.name] - declared_arguments(path)
    assert missing == set(), f"{path.name} lacks {sorted(missing)}"


def test_sim_launch_includes_deploy_launch_which_includes_nothing():
    assert included_launch_files(SIM_LAUNCH) == {DEPLOY_LAUNCH.name}
    assert included_launch_files(DEPLOY_LAUNCH) == set()
    assert f"launch/{DEPLOY_LAUNCH.name}" in installed_files()[f"share/{NAME}/launch"]  # where sim.launch.py looks


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_refers_to_installed_parameter_files(path):
    installed = {Path(f).name for f in installed_files()[f"share/{NAME}/config"]}
    referenced = file_names(ast.parse(path.read_text()), ".yaml")
    assert referenced, f"{path.name} names no parameter file"
    assert referenced - installed == set(), f"{path.name} refers to {sorted(referenced - installed)}, not installed"
    for node in launched_nodes(path):
        assert len(node.configs) == 1, f"{path.name}: {node.executable} gets parameter files {node.configs}"


def test_every_parameter_file_is_launched_under_its_node_name():
    launched = [n for path in LAUNCH_FILES for n in launched_nodes(path)]
    for config in CONFIG_FILES:
        users = [n for n in launched if config.name in n.configs]
        assert users, f"no launch file uses config/{config.name}"
        keys = list(yaml.safe_load(config.read_text()))
        assert [n.name for n in users] == keys * len(users), \
            f"config/{config.name} configures {keys}, launch files name the node {[n.name for n in users]}"


# ---- parameter files against the real nodes ---------------------------------------------------------

def node_class(executable: str) -> type:
    """The rclpy Node subclass that a console script spins (the one defined in its s2r.ros module)."""
    from rclpy.node import Node

    module = importlib.import_module(f"s2r.ros.{NODE_MODULES[executable]}")
    classes = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, Node) and c.__module__ == module.__name__]
    assert len(classes) == 1, f"{module.__name__} defines node classes {classes}"
    return classes[0]


def executable_of(config: Path) -> str:
    return next(n.executable for path in LAUNCH_FILES for n in launched_nodes(path) if config.name in n.configs)


@pytest.mark.parametrize("config", CONFIG_FILES, ids=lambda p: p.name)
def test_parameter_file_sets_exactly_the_parameters_the_node_declares(config):
    needs_ros()
    import inspect

    import rclpy
    from rclpy.node import Node

    doc = yaml.safe_load(config.read_text())
    assert len(doc) == 1, f"config/{config.name}: one node per file, got {list(doc)}"
    (node_name, section), = doc.items()
    assert list(section) == ["ros__parameters"]
    params = section["ros__parameters"]
    cls = node_class(executable_of(config))
    assert inspect.signature(cls.__init__).parameters["node_name"].default == node_name

    ctx = rclpy.Context()
    rclpy.init(args=["--ros-args", "--params-file", str(config)], context=ctx, domain_id=DOMAIN_ID)
    node = bare = None
    try:
        node = cls(context=ctx)  # the file as rcl parses it: a value of the wrong type is refused here
        bare = Node("bare_node", context=ctx)
        declared = set(node.list_parameters([], 0).names) - set(bare.list_parameters([], 0).names)
        assert set(params) == declared, (f"config/{config.name}: not declared by {cls.__name__}: "
                                         f"{sorted(set(params) - declared)}; missing: {sorted(declared - set(params))}")
        got = {k: node.get_parameter(k).value for k in params}
        assert got == params
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in params.items()}
    finally:
        for n in (node, bare):
            if n is not None:
                n.destroy_node()
        ctx.try_shutdown()


# ---- launch files run against stand-ins of launch / launch_ros ------------------------------------------
# The stand-ins take the real constructors' arguments (launch 3.x, launch_ros 0.2x) and record them;
# ros2_launch() visits what they record as launch does: depth first, in order, in one context (an
# include sets its launch_arguments as launch configurations, unscoped, before its entities run; a
# declaration sets its default only where the configuration is not set yet). ParameterValue coercion
# follows launch.utilities.type_utils.coerce_to_type, and a bare substitution in a parameter dict is
# YAML-parsed as launch_ros does (so rate_hz:=50 would arrive as the int 50, which the node's double
# parameter refuses). Conditions are not evaluated: an entity that has one is refused.

class StubLaunchDescription:
    def __init__(self, initial_entities=None, *, deprecated_reason=None):
        self.entities = list(initial_entities or [])


class StubDeclareLaunchArgument:
    def __init__(self, name, *, default_value=None, description=None, choices=None, condition=None):
        self.name, self.default_value, self.choices = name, default_value, choices
        self.condition = condition


class StubOpaqueFunction:
    def __init__(self, *, function, args=None, kwargs=None, condition=None):
        self.function, self.args, self.kwargs = function, args or [], kwargs or {}
        self.condition = condition


class StubIncludeLaunchDescription:
    def __init__(self, launch_description_source, *, launch_arguments=None, condition=None):
        self.launch_description_source, self.condition = launch_description_source, condition
        self.launch_arguments = () if launch_arguments is None else tuple(launch_arguments)


def stub_load_python_launch_file_as_module(path: str) -> types.ModuleType:
    """launch's loader: the file run as a module named python_launch_file, with __file__ set."""
    loader = importlib.machinery.SourceFileLoader("python_launch_file", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


class StubPythonLaunchDescriptionSource:
    def __init__(self, launch_file_path):
        self.location = launch_file_path

    def get_launch_description(self, context):
        return stub_load_python_launch_file_as_module(perform(self.location, context)).generate_launch_description()

    def try_get_launch_description_without_context(self):
        """What `--show-args` follows: None where the path needs a launch configuration."""
        try:
            return self.get_launch_description(types.SimpleNamespace(launch_configurations={}))
        except LookupError:
            return None


class StubLaunchConfiguration:
    def __init__(self, variable_name, *, default=None):
        self.variable_name, self.default = variable_name, default

    def perform(self, context) -> str:
        value = context.launch_configurations.get(self.variable_name, self.default)
        if value is None:
            raise LookupError(f"launch configuration '{self.variable_name}' does not exist")
        return value


class StubParameterValue:
    def __init__(self, value, *, value_type=None):
        self.value, self.value_type = value, value_type


class StubNode:
    def __init__(self, *, executable, package=None, name=None, namespace=None, exec_name=None, parameters=None,
                 remappings=None, ros_arguments=None, arguments=None, output="log", emulate_tty=False,
                 respawn=False, respawn_delay=None, condition=None):
        self.executable, self.package, self.name, self.parameters = executable, package, name, parameters or []
        self.condition = condition


def perform(value, context) -> str:
    """The text of a SomeSubstitutionsType: a string, a substitution or a list of them."""
    if isinstance(value, str):
        return value
    if isinstance(value, StubLaunchConfiguration):
        return value.perform(context)
    return "".join(perform(v, context) for v in value)


def evaluate(value, context):
    """A parameter value as the node receives it."""
    if isinstance(value, StubParameterValue):
        text = value.value.perform(context) if isinstance(value.value, StubLaunchConfiguration) else value.value
        if value.value_type in (None, bool):
            out = yaml.safe_load(text)
            assert value.value_type is None or isinstance(out, bool), f"'{text}' is not a bool"
            return out
        return value.value_type(text)
    if isinstance(value, StubLaunchConfiguration):
        out = yaml.safe_load(value.perform(context))
        return out if isinstance(out, (bool, int, float, str)) else value.perform(context)
    return value


@pytest.fixture
def launch_api(monkeypatch, tmp_path):
    """Stand-ins for launch / launch_ros, and an ament prefix holding what setup.py installs."""
    packages = pytest.importorskip("ament_index_python.packages")
    mods = {"launch": {"LaunchDescription": StubLaunchDescription},
            "launch.actions": {"DeclareLaunchArgument": StubDeclareLaunchArgument,
                               "IncludeLaunchDescription": StubIncludeLaunchDescription,
                               "OpaqueFunction": StubOpaqueFunction},
            "launch.launch_description_sources": {
                "PythonLaunchDescriptionSource": StubPythonLaunchDescriptionSource,
                "load_python_launch_file_as_module": stub_load_python_launch_file_as_module},
            "launch.substitutions": {"LaunchConfiguration": StubLaunchConfiguration},
            "launch_ros": {}, "launch_ros.actions": {"Node": StubNode},
            "launch_ros.parameter_descriptions": {"ParameterValue": StubParameterValue}}
    for name, attrs in mods.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    for dest, sources in installed_files().items():  # a colcon install, without colcon
        for src in sources:
            (tmp_path / dest).mkdir(parents=True, exist_ok=True)
            shutil.copy(PKG / src, tmp_path / dest / Path(src).name)
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path))
    assert packages.get_package_share_directory(NAME) == str(tmp_path / "share" / NAME)
    return tmp_path


def ros2_launch(path: Path, **cli: str) -> list[tuple[StubNode, Path, dict]]:
    """`ros2 launch s2r_ros <path> k:=v ...` up to the nodes: [(node, its parameter file, its overrides)].

    As ros2launch does, the file is included with the command line as its launch arguments. A node's
    parameters are evaluated when it is visited, where launch_ros would start it."""
    context = types.SimpleNamespace(launch_configurations={})
    declared, started = set(), []

    def visit(entity):
        assert getattr(entity, "condition", None) is None, f"the stand-ins do not evaluate conditions: {entity}"
        configs = context.launch_configurations
        if isinstance(entity, StubLaunchDescription):
            for e in entity.entities:
                visit(e)
        elif isinstance(entity, StubIncludeLaunchDescription):
            description = entity.launch_description_source.get_launch_description(context)
            for name, value in entity.launch_arguments:  # SetLaunchConfiguration, not scoped to the include
                configs[perform(name, context)] = perform(value, context)
            visit(description)
        elif isinstance(entity, StubDeclareLaunchArgument):
            declared.add(entity.name)
            if entity.name not in configs:
                assert entity.default_value is not None, f"required launch argument '{entity.name}' not given"
                configs[entity.name] = perform(entity.default_value, context)
            assert entity.choices is None or configs[entity.name] in entity.choices, (entity.name, entity.choices)
        elif isinstance(entity, StubOpaqueFunction):
            for e in entity.function(context, *entity.args, **entity.kwargs) or []:
                visit(e)
        elif isinstance(entity, StubNode):
            files = [Path(evaluate(p, context)) for p in entity.parameters if not isinstance(p, dict)]
            overrides = {k: evaluate(v, context) for p in entity.parameters if isinstance(p, dict)
                         for k, v in p.items()}
            assert len(files) == 1, f"{path.name}: {entity.executable} gets parameter files {files}"
            started.append((entity, files[0], overrides))
        else:
            raise TypeError(f"the stand-ins cannot run {entity!r}")

    visit(StubIncludeLaunchDescription(StubPythonLaunchDescriptionSource(str(path)), launch_arguments=cli.items()))
    assert set(cli) <= declared, f"{path.name} declares no launch argument {sorted(set(cli) - declared)}"
    return started


def shown_arguments(path: Path) -> dict[str, StubDeclareLaunchArgument]:
    """What `ros2 launch s2r_ros <path> --show-args` lists (LaunchDescription.get_launch_arguments):
    the declarations found without running anything, included files followed, the first of a name winning."""
    shown: dict[str, StubDeclareLaunchArgument] = {}

    def walk(entities):
        for e in entities:
            if isinstance(e, StubDeclareLaunchArgument):
                shown.setdefault(e.name, e)
            elif isinstance(e, StubIncludeLaunchDescription):
                walk(getattr(e.launch_description_source.try_get_launch_description_without_context(),
                             "entities", []))

    walk(stub_load_python_launch_file_as_module(str(path)).generate_launch_description().entities)
    return shown


def policy_node(path: Path, **cli: str) -> tuple:
    """The policy node that launching `path` starts: (package, executable, name, parameter file, overrides)."""
    started = [(n.package, n.executable, n.name, config, overrides)
               for n, config, overrides in ros2_launch(path, **cli) if n.executable == "policy_node"]
    assert len(started) == 1, f"{path.name} starts {len(started)} policy nodes"
    return started[0]


# a value for each launch argument, other than its default (a new argument needs one here)
SAMPLE_ARGS = {"policy_config": "/robot/config/my_policy_node.yaml", "policy_path": "/robot/policies/123",
               "robot_spec": "g1/g1.yaml", "rate_hz": "50", "controller_name": "leg_controller",
               "sim_config": "/robot/config/my_sim_bridge.yaml", "gantry": "true"}


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_without_arguments_uses_the_installed_yaml_alone(launch_api, path):
    for node, config, overrides in ros2_launch(path):
        assert config.is_file() and config.is_relative_to(launch_api / "share" / NAME / "config"), config
        assert list(yaml.safe_load(config.read_text())) == [node.name]
        assert overrides == {}, f"{node.executable}: overrides the YAML with {overrides} when given no argument"


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_arguments_override_the_yaml_with_the_declared_types(launch_api, path):
    cli = {k: v for k, v in SAMPLE_ARGS.items() if k in REQUIRED_ARGS[path.name]}
    want = {"policy_node": {"policy_path": "/robot/policies/123", "robot_spec": "g1/g1.yaml", "rate_hz": 50.0,
                            "controller_name": "leg_controller"},
            "sim_bridge": {"robot_spec": "g1/g1.yaml", "controller_name": "leg_controller", "gantry": True}}
    launched = ros2_launch(path, **cli)
    for node, config, overrides in launched:
        assert overrides == want[node.executable], node.executable
        params = yaml.safe_load(config.read_text())[node.name]["ros__parameters"]
        # the YAML's types are the node's declared ones (test above): an override must keep them
        assert {k: type(params[k]) for k in overrides} == {k: type(v) for k, v in overrides.items()}
    assert sorted(n.executable for n, _, _ in launched) == (["policy_node"] if path == DEPLOY_LAUNCH
                                                            else ["policy_node", "sim_bridge"])


def test_sim_launch_starts_the_policy_node_of_deploy_launch(launch_api):
    assert policy_node(SIM_LAUNCH) == policy_node(DEPLOY_LAUNCH)


@pytest.mark.parametrize("arg", sorted(declared_arguments(DEPLOY_LAUNCH)))
def test_every_deploy_launch_argument_reaches_the_policy_node_through_sim_launch(launch_api, arg):
    assert arg in SAMPLE_ARGS, f"deploy.launch.py's argument '{arg}' needs a value in SAMPLE_ARGS"
    through_deploy = policy_node(DEPLOY_LAUNCH, **{arg: SAMPLE_ARGS[arg]})
    assert through_deploy != policy_node(DEPLOY_LAUNCH), f"{arg}:={SAMPLE_ARGS[arg]} changes nothing"
    assert policy_node(SIM_LAUNCH, **{arg: SAMPLE_ARGS[arg]}) == through_deploy


def test_sim_launch_show_args_lists_every_deploy_launch_argument(launch_api):
    shown = set(shown_arguments(SIM_LAUNCH))
    assert shown == declared_arguments(SIM_LAUNCH)  # the include is followed without running anything
    assert set(shown_arguments(DEPLOY_LAUNCH)) <= shown


# ---- colcon build --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def colcon_install(tmp_path_factory):
    """A real `colcon build` of a copy of the workspace: -> the install prefix."""
    ws = tmp_path_factory.mktemp("ros_ws")
    shutil.copytree(PKG, ws / "src" / NAME, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "colcon", "--log-base", str(ws / "log"), "build",
                          "--base-paths", str(ws / "src"), "--build-base", str(ws / "build"),
                          "--install-base", str(ws / "install")],
                         cwd=ws, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "doesn't explicitly install" not in out, out  # colcon-ros would paper over a missing marker
    print(f"colcon build of {NAME}: {time.monotonic() - t0:.1f} s")
    return ws / "install"


@pytest.mark.skipif(not HAVE_COLCON, reason="colcon is not installed (pip install colcon-ros)")
def test_colcon_build_installs_executables_launch_and_parameter_files(colcon_install):
    prefix = colcon_install / NAME
    for script in console_scripts():
        exe = prefix / "lib" / NAME / script
        assert exe.is_file() and os.access(exe, os.X_OK), f"{exe} missing: `ros2 run {NAME} {script}` fails"
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / NAME).is_file()
    share = prefix / "share" / NAME
    assert (share / "package.xml").is_file()
    assert sorted(p.name for p in (share / "launch").iterdir()) == [p.name for p in LAUNCH_FILES]
    assert sorted(p.name for p in (share / "config").iterdir()) == [p.name for p in CONFIG_FILES]


def sourced(install: Path, command: str) -> list[str]:
    """A shell command run after `. install/setup.sh`, as in a terminal where the workspace is sourced."""
    return ["sh", "-c", f'. "{install}/setup.sh" && {command}']


@pytest.mark.skipif(not HAVE_COLCON, reason="colcon is not installed (pip install colcon-ros)")
def test_installed_policy_node_starts_from_the_installed_yaml_and_exits_cleanly_on_sigint(colcon_install, tmp_path):
    needs_ros()
    share = colcon_install / NAME / "share" / NAME
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMENT_", "COLCON_"))}
    env.update(ROS_DOMAIN_ID=str(DOMAIN_ID), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               RCUTILS_LOGGING_BUFFERED_STREAM="0", PYTHONUNBUFFERED="1")
    lookup = subprocess.run(sourced(colcon_install, f'"{sys.executable}" -c "from ament_index_python.packages '
                                                    f'import get_package_share_directory as g; print(g(\'{NAME}\'))"'),
                            env=env, capture_output=True, text=True, timeout=60)
    assert lookup.stdout.strip() == str(share), lookup.stderr  # what the launch files call

    log = tmp_path / "policy_node.log"
    exe = colcon_install / NAME / "lib" / NAME / "policy_node"
    with open(log, "w") as f:  # `ros2 run s2r_ros policy_node --ros-args --params-file ...`
        proc = subprocess.Popen(sourced(colcon_install, f'exec "{exe}" --ros-args --params-file '
                                                        f'"{share}/config/policy_node.yaml"'),
                                env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        t_end = time.monotonic() + 60
        while "mode PASSIVE" not in log.read_text() and proc.poll() is None and time.monotonic() < t_end:
            time.sleep(0.1)
        assert "mode PASSIVE" in log.read_text(), log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)  # what ros2 launch sends on Ctrl-C
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

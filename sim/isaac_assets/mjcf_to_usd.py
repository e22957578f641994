"""Convert one of s2r's MJCF robots into a single-file USD asset for Isaac Lab (kit-less, Newton).

    python sim/isaac_assets/mjcf_to_usd.py sim/robots/g1/g1.xml sim/isaac_assets/g1.usda \
        --converter /tmp/usdconv/bin/mujoco_usd_converter

Two steps:
  1. NVIDIA's `mujoco-usd-converter` (PyPI, 0.8.0 tested) converts the MJCF (`--no-layer-structure
     --no-physics-scene`: one USDC layer, no physics scene). It needs mujoco>=3.16, which conflicts
     with .venv-isaac's pins (mujoco 3.12): install it in a venv of its own
     (`python3.12 -m venv /tmp/usdconv && /tmp/usdconv/bin/pip install mujoco-usd-converter`) and
     pass its executable as --converter.
  2. The layer is flattened and written as .usda with the MJCF's world-body extras removed: the
     `floor` plane (Isaac Lab spawns its own ground; a floor inside the robot asset would be cloned
     with every env) and the `MjcActuator` prims (Isaac Lab's actuator config drives the joints;
     Newton 1.6.1 under Isaac Lab ignores them: trajectories with and without them are identical).

Runs in any Python that has `pxr` (usd-core): the converter's venv or .venv-isaac. Rerun it when the
MJCF changes; the committed sim/isaac_assets/g1.usda is this script's output for sim/robots/g1/g1.xml.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REMOVE_NAMES = ("floor",)  # world-body geoms of s2r's MJCFs that are scene, not robot
REMOVE_TYPES = ("MjcActuator", "PhysicsScene")


def convert(mjcf: Path, out: Path, converter: str = "mujoco_usd_converter", drop: tuple[str, ...] = ()) -> list[str]:
    """MJCF -> flattened .usda at `out`; returns the removed prim paths. `drop`: more prim names to
    remove (scene bodies of the MJCF that are not the robot, e.g. panda.xml's `cube` and `target`)."""
    from pxr import Sdf, Usd

    exe = shutil.which(converter) or converter
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([exe, "--no-layer-structure", "--no-physics-scene", str(mjcf), tmp], check=True)
        usdc = sorted(Path(tmp).glob("*.usd*"))
        if len(usdc) != 1:
            raise SystemExit(f"{exe} wrote {usdc}, expected one USD file")
        layer = Usd.Stage.Open(str(usdc[0])).Flatten()

    removed: list[Sdf.Path] = []

    def walk(spec):
        for child in list(spec.nameChildren):
            if child.name in REMOVE_NAMES + tuple(drop) or child.typeName in REMOVE_TYPES:
                removed.append(child.path)
            else:
                walk(child)

    walk(layer.pseudoRoot)
    for path in removed:
        parent = layer.GetPrimAtPath(path.GetParentPath()) if path.GetParentPath() != Sdf.Path.absoluteRootPath \
            else layer.pseudoRoot
        del parent.nameChildren[path.name]
    layer.documentation = f"made by sim/isaac_assets/mjcf_to_usd.py from {mjcf.name} (mujoco-usd-converter)"
    out.parent.mkdir(parents=True, exist_ok=True)
    layer.Export(str(out))
    return [str(p) for p in removed]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mjcf", type=Path)
    ap.add_argument("out", type=Path, help="the .usda to write")
    ap.add_argument("--converter", default="mujoco_usd_converter",
                    help="mujoco_usd_converter executable (default: on the PATH)")
    ap.add_argument("--drop", action="append", default=[], metavar="NAME",
                    help="also remove prims of this name (bodies that are scene, not robot); repeatable")
    args = ap.parse_args(argv)
    removed = convert(args.mjcf, args.out, args.converter, tuple(args.drop))
    print(f"wrote {args.out} (removed {len(removed)} prims: {', '.join(removed)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

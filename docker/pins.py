"""Requirement and constraint lists for the image builds, from pyproject.toml and
docker/constraints.txt (so that no image lists its dependencies a second time).

    python3 docker/pins.py requirements --without torch deepspeed > requirements.txt
    python3 docker/pins.py requirements --extra ray > requirements.txt
    python3 docker/pins.py constraints > constraints.txt
    python3 docker/pins.py constraints --keep-installed > constraints.txt
    python3 docker/pins.py freeze > docker/constraints.txt   # from a passing environment

`--keep-installed` pins every package the base image already has to the version it has, so
installing rlad on the vLLM image never moves that image's CUDA stack (torch, transformers
as vLLM pinned them); a base version outside rlad's ranges then fails the build loudly.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if match is None:
        raise ValueError(f"not a requirement: {spec!r}")
    return normalize(match.group(1))


def requirements(pyproject: Path, without: set[str], extras: tuple[str, ...] = ()) -> list[str]:
    """rlad's runtime dependencies and those of the named extras, less the named ones."""
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = [
        *project["dependencies"],
        *(d for e in extras for d in project["optional-dependencies"][e]),
    ]
    return [d for d in deps if requirement_name(d) not in {normalize(w) for w in without}]


def pins(constraints: Path) -> dict[str, str]:
    """`name -> version` of every `name==version` line."""
    found = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[normalize(name)] = version.strip()
    return found


def constraints(constraints_file: Path, keep_installed: bool) -> list[str]:
    lines = []
    for name, version in sorted(pins(constraints_file).items()):
        if keep_installed:
            with contextlib.suppress(metadata.PackageNotFoundError):
                version = metadata.version(name)
        lines.append(f"{name}=={version}")
    return lines


def freeze(pyproject: Path, skip: tuple[str, ...] = ("torch", "setuptools")) -> list[str]:
    """`name==version` of every installed package rlad depends on, transitively (extras left
    out); torch is pinned per image, setuptools is the build backend's business."""
    from packaging.requirements import Requirement  # dev time only: not in a bare image

    found: dict[str, str] = {}
    todo = [requirement_name(spec) for spec in requirements(pyproject, without=set())]
    while todo:
        name = normalize(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[name] = dist.version
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return [f"{name}=={version}" for name, version in sorted(found.items()) if name not in skip]


HEADER = """# Exact versions of rlad's runtime dependencies, as installed where the tests passed.
# The images install with these as constraints, so a rebuild gets the same stack. torch is
# pinned per image (TORCH_VERSION in docker/services.Dockerfile; the vLLM base image brings
# its own CUDA build). Regenerate: python3 docker/pins.py freeze > docker/constraints.txt
# (tests/unit/services/test_dockerfiles.py checks every pin satisfies pyproject.toml)."""


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    req = sub.add_parser("requirements")
    req.add_argument("--without", nargs="*", default=[])
    req.add_argument("--extra", action="append", default=[], help="An extra's too, e.g. ray.")
    con = sub.add_parser("constraints")
    con.add_argument("--keep-installed", action="store_true")
    sub.add_parser("freeze")
    args = parser.parse_args(argv)
    if args.what == "freeze":
        lines = [HEADER, *freeze(ROOT / "pyproject.toml")]
    elif args.what == "requirements":
        lines = requirements(ROOT / "pyproject.toml", set(args.without), tuple(args.extra))
    else:
        lines = constraints(ROOT / "docker" / "constraints.txt", args.keep_installed)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])

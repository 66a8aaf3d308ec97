"""Print pip constraints that pin every `>=` lower bound pyproject.toml declares (dependencies and the extras
named on the command line) to that exact version: `make floors` installs the package with them and runs the
suite, so the declared floors are versions the suite has passed on.

    python tools/floor_constraints.py [pyproject.toml] [--extras test,hub] > constraints.txt
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

# "name>=1.2" with nothing after but an optional upper bound or environment marker.
FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)")


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The dependencies and the named extras' requirements, following extras that name the package itself."""
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    out, seen, todo = list(project.get("dependencies", [])), set(), list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"error: pyproject.toml has no extra {extra!r} (it has: {', '.join(optional)})")
        seen.add(extra)
        for req in optional[extra]:
            self_extras = re.match(rf"^{re.escape(name)}\[([^\]]*)\]$", req.strip())
            if self_extras:
                todo += [e.strip() for e in self_extras.group(1).split(",")]
            else:
                out.append(req)
    return out


def floors(reqs: list[str]) -> dict[str, str]:
    """name -> lower bound, for each requirement that declares one."""
    pins = {}
    for req in reqs:
        match = FLOOR.match(req)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pyproject", nargs="?", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--extras", default="", help="comma-separated extras to include (e.g. test,hub)")
    args = parser.parse_args(argv)
    if tomllib is None:
        print("error: this script needs Python 3.11 or later (tomllib)", file=sys.stderr)
        return 2
    project = tomllib.loads(args.pyproject.read_text())["project"]
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    for name, version in sorted(floors(requirements(project, extras)).items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

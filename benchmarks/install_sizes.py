"""Installed size of himir-rag's base install and of what each extra adds, from an environment's RECORD files.

Run with the environment's Python, from the repository root::

    .venv/bin/python benchmarks/install_sizes.py pyproject.toml

A distribution counts towards an extra only when the base install does not already pull it in.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


DISTRIBUTIONS = {_name(d.metadata["Name"]): d for d in metadata.distributions()}


def installed_bytes(name: str) -> int:
    """Bytes of the files a distribution's RECORD lists (those present)."""
    total = 0
    for file in DISTRIBUTIONS[name].files or []:
        try:
            total += Path(DISTRIBUTIONS[name].locate_file(file)).stat().st_size
        except OSError:
            pass
    return total


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras | {""})


def closure(requirements: list[str]) -> set[str]:
    """Installed distributions that ``requirements`` pull in, transitively (extras such as ray[data] followed)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = _name(requirement.name)
        if name in seen or name not in DISTRIBUTIONS or not _applies(requirement, set()):
            continue
        seen.add(name)
        todo += [sub for sub in map(Requirement, DISTRIBUTIONS[name].requires or [])
                 if _applies(sub, set(requirement.extras))]
    return seen


def main(pyproject: str) -> None:
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    base = closure(project["dependencies"])

    def megabytes(names: set[str]) -> float:
        return sum(installed_bytes(n) for n in names) / 1e6

    def largest(names: set[str]) -> str:
        top = sorted(names, key=installed_bytes, reverse=True)[:4]
        return ", ".join(f"{n} {installed_bytes(n) / 1e6:.0f} MB" for n in top)

    print(f"base: {len(base)} distributions, {megabytes(base):.0f} MB ({largest(base)})")
    for extra, requirements in project["optional-dependencies"].items():
        added = closure(requirements) - base
        missing = [r for r in requirements if _name(Requirement(r).name) not in DISTRIBUTIONS]
        note = f"; not installed here: {', '.join(missing)}" if missing else ""
        print(f"[{extra}]: +{len(added)} distributions, +{megabytes(added):.0f} MB ({largest(added)}){note}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")

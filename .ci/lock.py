"""Write `constraints.txt`: the exact versions of pandallm's dependencies (with the `test`, `wandb` and `tensorboard`
extras) installed in this environment, the one the test suite has just passed in. `nox -s lock` runs it;
`--compare` prints the installed packages that differ from the file instead (`nox -s latest` does).

pyproject.toml keeps ranges, for library users; `.ci/run` and the README's install commands pass this file to pip
(`pip install -c constraints.txt ...`), so that a fresh clone installs what CI tested. The dependency closure is read
from the installed packages' metadata; a dependency that is not installed here (DeepSpeed on a CPU machine) is left
out and named.
"""

from __future__ import annotations

import datetime
import platform
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("test", "wandb", "tensorboard")


def top_level(extras: tuple[str, ...] | set[str] = EXTRAS) -> list[Requirement]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    wanted = [*(project["dependencies"] if extras == EXTRAS else []), *(r for e in extras for r in optional.get(e, []))]
    return [Requirement(r) for r in wanted]


def closure(requirements: list[Requirement]) -> tuple[dict[str, str], list[str]]:
    """Installed name -> version for the requirements and everything they need; and the ones not installed."""
    found: dict[str, str] = {}
    missing: list[str] = []
    queue = [(r, set()) for r in requirements]
    seen_extras: dict[str, set[str]] = {}
    while queue:
        requirement, parent_extras = queue.pop()
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in (parent_extras or {""})
        ):
            continue
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name == "pandallm":  # an extra that names others (`pandallm[metrics]`): those, from pyproject.toml
            queue += [(r, set()) for r in top_level(extras)]
            continue
        if name in found and extras <= seen_extras.get(name, set()):
            continue
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(str(requirement))
            continue
        found[name] = dist.version
        seen_extras[name] = seen_extras.get(name, set()) | extras
        queue += [(Requirement(r), extras) for r in dist.requires or []]
    return found, missing


def compare() -> None:
    """Print each pinned package whose installed version differs from constraints.txt."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pinned = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    for requirement in pinned:
        try:
            installed = metadata.version(requirement.name).split("+")[0]
        except metadata.PackageNotFoundError:
            continue
        if installed not in requirement.specifier:
            print(f"differs from constraints.txt: {requirement.name} {requirement.specifier} -> {installed}")


def main() -> None:
    if sys.argv[1:] == ["--compare"]:
        compare()
        return
    found, missing = closure(top_level())
    # The CPU wheel is `2.13.0+cpu`; `torch==2.13.0` admits it here and the CUDA build on a GPU machine.
    lines = [f"{name}=={version.split('+')[0]}" for name, version in sorted(found.items())]
    header = [
        "# The versions the test suite passed with: pandallm's dependencies and extras test, wandb, tensorboard.",
        f"# Written by `nox -s lock` (.ci/lock.py) on {datetime.date.today()}, Python {platform.python_version()}.",
        "# Used by .ci/run and the README's install commands (pip install -c constraints.txt ...); pyproject.toml",
        "# keeps ranges for library users. `nox -s latest` tests the newest releases the ranges admit.",
    ]
    if missing:
        header.append(f"# Not installed where this was written, so not pinned: {', '.join(sorted(missing))}")
    (ROOT / "constraints.txt").write_text("\n".join([*header, *lines]) + "\n")
    print(f"constraints.txt: {len(lines)} packages" + (f"; not installed: {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    main()

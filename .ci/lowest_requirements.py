"""Print the lowest versions pyproject.toml declares, pinned, for the install that proves the floors are true.

python .ci/lowest_requirements.py cpu test > lowest.txt    # the dependencies and those extras, each at its minimum
"""

import re
import sys
from pathlib import Path

import tomllib

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)\s*(;.*)?$")


def pinned(requirement):
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise SystemExit(f"{requirement!r} has no '>=' floor: give every dependency its tested minimum")
    name, extras, version, marker = match.groups()
    return f"{name}{extras or ''}=={version}{marker or ''}"


def main(extras):
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    print("\n".join(pinned(r) for r in requirements))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Print pip constraints pinning each core dependency to the lowest version
pyproject.toml allows (``name>=X`` -> ``name==X``), so CI can test that the lower
bounds are true. Extras are left to resolve to their newest versions."""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

root = Path(__file__).resolve().parent.parent
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"]:
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*([^;]*)", requirement)
    if match is None:
        sys.exit(f"cannot read the requirement {requirement!r}")
    name, spec = match.groups()
    lower = re.search(r">=\s*([0-9][^,\s]*)", spec)
    if lower is None:
        sys.exit(f"{name}: no lower bound (>=) in pyproject.toml: every core dependency needs one")
    print(f"{name}=={lower.group(1)}")

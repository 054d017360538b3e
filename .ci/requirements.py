"""Print the project's requirements and test extra (pyproject.toml), one a line, but torch and torchvision, which
.ci/run installs at the GPU machines' versions."""

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, which the project supports, has no tomllib; pip (in every venv) vendors it
    from pip._vendor import tomli as tomllib

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    if not re.match(r"(torch|torchvision)\b(?!-)", requirement):  # not torch-tb-profiler
        sys.stdout.write(f"{requirement}\n")

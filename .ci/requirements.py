"""Print the project's requirements and test extra (pyproject.toml), one a line, but torch and torchvision, whose
pins .ci/run replaces with the GPU machines' versions."""

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, which the project supports, has no tomllib; pip (in every venv) vendors it
    from pip._vendor import tomli as tomllib

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    if not requirement.startswith(("torch==", "torchvision==")):
        sys.stdout.write(f"{requirement}\n")

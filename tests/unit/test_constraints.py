"""constraints.txt: the tested versions the README's quickstart and .ci/run install with."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        found[canonical(match.group(1))] = match.group(2)
    return found


def test_every_direct_dependency_and_readme_package_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the vllm extra is not installed here (CUDA only): its range is TRL's (tests/unit/test_generation.py)
    untested = {"vllm"}
    requirements = project["dependencies"] + [r for name, extra in project["optional-dependencies"].items()
                                              if name not in untested for r in extra]
    direct = {canonical(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}
    named_in_readme = {"torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "trl", "hydra-core", "pytest"}
    missing = sorted((direct | named_in_readme) - set(pins()))
    assert not missing, f"constraints.txt does not pin {missing}"
    assert "+" not in pins()["torch"], "pin torch without a local build tag, so CPU and CUDA builds both match"


def test_readme_quickstart_and_ci_install_with_the_constraints():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert "-c constraints.txt" in quickstart
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"pip install .*-e \"\.\[dev\]\" -c constraints\.txt", ci)


@pytest.mark.slow
def test_resolver_dry_run_installs_exactly_the_pinned_versions(tmp_path):
    """pip's resolver on a fresh target: everything it would install is pinned, at that version."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[dev]"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pinned = pins()
    would_install = {canonical(item["metadata"]["name"]): item["metadata"]["version"]
                     for item in json.loads(report.read_text())["install"]}
    would_install.pop("posttrain-pipeline")
    unpinned = sorted(set(would_install) - set(pinned))
    assert not unpinned, f"the resolver would install packages constraints.txt does not pin: {unpinned}"
    wrong = {name: (v, pinned[name]) for name, v in would_install.items() if v.split("+")[0] != pinned[name]}
    assert not wrong, f"resolved versions differ from the pins: {wrong}"

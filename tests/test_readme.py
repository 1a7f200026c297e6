"""The README's quick-start commands are the ones CI and the Makefile run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [
        line.strip().split("#")[0].strip()
        for line in section.splitlines()
        if line.startswith("    ")
    ]


def test_quick_start_has_the_demo_and_the_test_command():
    assert _quick_start_commands() == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [
        line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert "make test" in commands


def test_make_targets_run_the_demo_and_pytest():
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo: .*\n\t(.*)$", makefile, re.MULTILINE)
    test = re.search(r"^test: .*\n\t(.*)$", makefile, re.MULTILINE)
    assert demo and "-m etap_torch demo" in demo.group(1)
    assert test and "-m pytest" in test.group(1)

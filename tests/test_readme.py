"""CI proves what a newcomer runs: .ci/run calls the README's test command word for word."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = readme.split("```bash\n")
    serve_cmd = blocks[1].split("\n```")[0].strip()
    test_cmd = blocks[2].split("\n```")[0].strip()
    assert serve_cmd.endswith("admiral-optimizer serve")
    assert test_cmd in ci.splitlines()

"""`rankpipe demo` runs every stage on the built-in data; the README's quick start is what CI runs."""

import json
import re
from pathlib import Path

from click.testing import CliRunner

from rankpipe.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_every_stage_and_reruns_in_place(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--images", "60", "--steps", "4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for line in ("1/4", "2/4", "3/4", "4/4", "demo finished"):
        assert line in result.output
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {q["label"] for q in results["queries"]} == {"red_discs", "brightness", "colorfulness"}
    for path in ("run/best.pt", "eval/rankings.csv", "eval/report/index.html", "shards/manifest.yaml"):
        assert (out / path).is_file(), path
    # A second run replaces the demo's own folder.
    assert CliRunner().invoke(cli, args).exit_code == 0


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--images", "60", "--steps", "1"])
    assert result.exit_code == 2
    assert "was not made by `rankpipe demo`" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick_start = re.search(r"## Quick start\s+```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in quick_start.strip().splitlines()]
    assert len(commands) == 2 and commands[0].endswith("rankpipe demo")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()

"""benchmarks/gpu_suite.sh in its CPU mode (--tiny): every table file appears and holds a real table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"
TABLES = ("embed_vit_b_16", "embed_convnext_large_d_320", "train_loop", "train_step_eager", "sweep_16_vs_1",
          "embed_workers", "store_write", "tar_read")


def number(text: str) -> float:
    return float(text.replace(",", "").rstrip("x"))


def table_rows(text: str) -> list[list[str]]:
    """The ` | `-separated lines of a table, split into cells (header first)."""
    return [[cell.strip() for cell in line.split(" | ")] for line in text.splitlines() if " | " in line]


@pytest.fixture(scope="module")
def suite_output(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("suite")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SUITE), str(out / "tables"), "--tiny"], capture_output=True, text=True, env=env,
                          cwd=out, timeout=1500)
    return done, out / "tables"


def test_the_tiny_suite_runs_every_benchmark_and_writes_its_table(suite_output):
    done, tables = suite_output
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.stem for p in tables.iterdir()) == sorted(TABLES)
    for name in TABLES:
        assert f"=== {name}: python -m rankpipe.benchmarks." in done.stdout
        assert (tables / f"{name}.txt").read_text().strip() in done.stdout  # printed as well as written
    assert "train_step_compiled" not in done.stdout  # compilation is left out on the CPU


def test_embed_tables_give_pipeline_backbone_and_their_ratio(suite_output):
    _, tables = suite_output
    for name in ("embed_vit_b_16", "embed_convnext_large_d_320"):
        text = (tables / f"{name}.txt").read_text()
        values = dict(re.findall(r"^(.+?)\s{2,}(.+)$", text, flags=re.M))
        pipeline, backbone = number(values["pipeline img/s"]), number(values["backbone-only img/s"])
        assert pipeline > 0 and backbone > 0
        assert number(values["ratio"]) == pytest.approx(pipeline / backbone, abs=0.01 + 0.02 * pipeline / backbone)
        assert ("read img/s (alone)" in values) == (name == "embed_vit_b_16")  # --stages on the first only


def test_training_tables_give_milliseconds_per_step(suite_output):
    _, tables = suite_output
    loop = re.search(r"^off\s+([\d.]+)\s+([\d.]+)", (tables / "train_loop.txt").read_text(), flags=re.M)
    assert loop and float(loop.group(2)) > 0
    step = re.search(r"^\s+16\s+([\d.]+)", (tables / "train_step_eager.txt").read_text(), flags=re.M)
    assert step and float(step.group(1)) > 0


def test_io_tables_give_ratios_of_their_own_rates(suite_output):
    _, tables = suite_output
    header, *rows = table_rows((tables / "store_write.txt").read_text())
    assert rows and header[:2] == ["codec pipeline", "threads"]
    for row in rows:
        cells = dict(zip(header, row))
        plain, writer = number(cells["plain MB/s"]), number(cells["writer MB/s"])
        if plain >= 10 and writer >= 10:  # rates print without decimals; tiny stores write a few MB
            assert number(cells["ratio"]) == pytest.approx(writer / plain, rel=0.15)
    header, *rows = table_rows((tables / "tar_read.txt").read_text())
    assert header[0] == "page cache" and header[-1] == "ratio"
    # One pass per page-cache state, in this process and in DataLoader workers.
    assert [(row[0], row[2]) for row in rows] == [("cold", "in this process"), ("cold", "1 DataLoader worker"),
                                                  ("warm", "in this process"), ("warm", "1 DataLoader worker")]
    for row in rows:
        assert number(row[-1]) > 0 and number(row[-2]) > 0


def test_sweep_and_worker_tables_have_their_rows(suite_output):
    _, tables = suite_output
    sweep = (tables / "sweep_16_vs_1.txt").read_text()
    assert re.search(r"^\s*1\s", sweep, flags=re.M) and re.search(r"^\s*2\s", sweep, flags=re.M)
    rows = [line.split() for line in (tables / "embed_workers.txt").read_text().splitlines()
            if line.startswith(("single ", "cluster "))]
    assert [row[1] for row in rows] == ["1", "1", "2"]  # the single process, then clusters of 1 and 2 workers
    assert all(row[-1] == "yes" for row in rows)  # every cluster-written store byte-equal to the single one

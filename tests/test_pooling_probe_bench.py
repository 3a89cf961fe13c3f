"""benchmarks/pooling_probe.py at its smallest: every label gets the probe and each pooling, trained as named."""

from __future__ import annotations

from rankpipe.benchmarks import pooling_probe as bench


def test_main_trains_each_pooling_alone_per_label_and_prints_the_row(tiny_store, monkeypatch, capsys, one_thread):
    trained = []
    real = bench.train_from_store

    def recording(store, out_dir, run_config, labels):
        trained.append((tuple(labels), run_config.adapter.regression_pooling, run_config.train.seed,
                        run_config.train.max_steps))
        return real(store, out_dir, run_config, labels=labels)

    monkeypatch.setattr(bench, "train_from_store", recording)
    bench.main(["--store", str(tiny_store), "--labels", "squares", "--steps", "4", "--eval-every", "2", "--seeds", "2"])
    assert trained == [(("squares",), pooling, seed, 4) for pooling in bench.POOLINGS for seed in (0, 1)]
    lines = capsys.readouterr().out.splitlines()
    assert "weights none" in lines[0] and "4 steps" in lines[0]
    (row,) = [line for line in lines if line.startswith("| squares |")]
    probe, *poolings = [cell.strip() for cell in row.strip("|").split("|")[1:]]
    assert -1 <= float(probe) <= 1
    for cell in poolings:
        assert [part.split(":")[0].strip() for part in cell.split(",")] == ["0", "1"]
        assert all(-1 <= float(part.split(":")[1].split("@")[0]) <= 1 for part in cell.split(","))

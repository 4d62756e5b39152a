"""``mmcurate stream``: the loader from the command line."""
from __future__ import annotations

import re

import pytest

from helpers.loader_output import write_output
from pipeline.cli.main import main


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_output(root, [7, 0, 6])
    return root


def test_stream_reports_samples_per_second(out, capsys):
    assert main(["stream", str(out), "--batch-size", "4", "--workers", "2", "--fields", "jpg,txt",
                 "--epochs", "2", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "13 samples in 3 shards" in lines[0] and "fields jpg,txt" in lines[0]
    for epoch, line in enumerate(lines[1:]):
        assert re.match(rf"epoch {epoch}: 13 samples in 4 batches, [\d.]+ s, [\d,]+ samples/s$", line), line


def test_stream_max_batches_and_raw_bytes(out, capsys):
    assert main(["stream", str(out), "--batch-size", "2", "--workers", "0", "--max-batches", "3",
                 "--no-decode", "--no-progress"]) == 0
    assert "epoch 0: 6 samples in 3 batches" in capsys.readouterr().out


def test_stream_exits_1_on_damaged_data(out, tmp_path, capsys):
    import shutil

    shutil.copytree(out, tmp_path / "copy")
    (tmp_path / "copy" / "00002.tar").unlink()
    assert main(["stream", str(tmp_path / "copy"), "--batch-size", "4", "--workers", "0", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "6 missing or corrupt" in captured.out and "00002.tar" in captured.err


def test_stream_rejects_bad_arguments(out, capsys):
    with pytest.raises(SystemExit):
        main(["stream", str(out), "--batch-size", "0"])
    assert "must be > 0" in capsys.readouterr().err

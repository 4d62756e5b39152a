"""A failed start leaves nothing that blocks the corrected rerun: a missing input file, an unknown
catalog, an output dir that is a file fail with exit 2 and one line naming the key, before the
output dir or its manifest exist; ``--dry-run`` checks the same, and that the output is writable."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers.jobs import job_file

from pipeline.cli.main import main
from pipeline.core.config import ConfigError
from pipeline.job.runner import check_start
from pipeline.job.spec import load_job


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_input_file_then_the_corrected_run(tmp_path, server, capsys):
    job = job_file(tmp_path, server, rows=16)
    good = yaml.safe_load(job.read_text())["input"]["files"][0]
    missing = str(tmp_path / "nowhere.parquet")
    assert main(["run", str(job), "--set", f"input.files={missing}"]) == 2
    line = error_line(capsys)
    assert "input.files" in line and missing in line
    assert not (tmp_path / "job").exists()
    # The fix (the bare string is a one-element list) runs: nothing of the failed start is in the way.
    assert main(["run", str(job), "--set", f"input.files={good}"]) == 0
    assert json.loads((tmp_path / "job" / "manifest.json").read_text())["status"] == "complete"


def test_unknown_catalog_names_the_key_and_close_matches(tmp_path, server, capsys):
    job = job_file(tmp_path, server, rows=8, input__catalog="coyo-70m")
    assert main(["run", str(job)]) == 2
    line = error_line(capsys)
    assert line.startswith("mmcurate: error: input.catalog:") and "coyo-700m" in line
    assert not (tmp_path / "job").exists()


def test_output_dir_that_is_a_file(tmp_path, server, capsys):
    (tmp_path / "job").write_text("not a folder")
    job = job_file(tmp_path, server, rows=8)
    assert main(["run", str(job)]) == 2
    assert "output.dir" in error_line(capsys) and (tmp_path / "job").read_text() == "not a folder"
    assert main(["run", str(job), "--set", f"output.dir={tmp_path / 'job' / 'under'}"]) == 2
    assert "which is a file" in error_line(capsys)
    (tmp_path / "job").unlink()
    assert main(["run", str(job)]) == 0


def test_dry_run_checks_inputs_and_output_and_writes_nothing(tmp_path, server, capsys):
    job = job_file(tmp_path, server, rows=8)
    assert main(["run", str(job), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["input"]["files"]
    assert not (tmp_path / "job").exists()  # a missing output dir is checked through its parent
    (tmp_path / "job").mkdir()
    assert main(["run", str(job), "--dry-run"]) == 0
    assert list((tmp_path / "job").iterdir()) == []  # the probe file is gone
    capsys.readouterr()
    assert main(["run", str(job), "--dry-run", "--set", f"input.files={tmp_path / 'gone.csv'}"]) == 2
    assert "input.files" in capsys.readouterr().err


def test_dry_run_refuses_an_output_that_cannot_be_written(tmp_path, server, monkeypatch):
    spec = load_job(job_file(tmp_path, server, rows=8))
    (tmp_path / "job").mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("builtins.open", refuse)  # root may write anywhere: stand in for a read-only mount
    with pytest.raises(ConfigError, match="output.dir: .* is not writable"):
        check_start(spec, writable=True)


def test_dry_run_checks_the_bucket_of_a_url(tmp_path, server, s3):
    check_start(load_job(job_file(tmp_path, server, rows=8, output__dir=s3.url("out"))), writable=True)
    spec = load_job(job_file(tmp_path, server, rows=8, output__dir="s3://no-such-bucket/out"))
    with pytest.raises(ConfigError, match="output.dir: .*no-such-bucket"):
        check_start(spec, writable=True)


def test_a_bare_string_is_a_list_only_where_the_spec_has_a_list(tmp_path):
    pq.write_table(pa.table({"url": ["http://x/a.jpg"]}), tmp_path / "a.parquet")
    data = {"input": {"files": ["other"]}}
    spec = load_job(data=data, overrides=[f"input.files={tmp_path / 'a.parquet'}", "input.url_col=link"])
    assert spec.input.files == [str(tmp_path / "a.parquet")] and spec.input.url_col == "link"
    with pytest.raises(ConfigError, match="download.image_size: expected an integer"):
        load_job(data=data, overrides=["download.image_size=big"])

"""`mmcurate retry`: a server that answered 503 (and 429) recovers; the retry fetches only those
samples again, rewrites only their shards, keeps every other file byte for byte, and a kill in
the middle of replacing a shard is finished by the next run."""
import contextlib
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from aiohttp import web

from helpers.jobs import jpeg
from pipeline.cli.main import main
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.loader import ShardDataset
from pipeline.sinks.storage import Directory
from pipeline.testing.serve import LocalServer

ROWS = 24  # 3 shards of 8
FLAKY = {1: 503, 5: 429, 17: 502, 20: 503}  # rows whose server fails until it recovers: shards 0 and 2
DEAD = {2, 11}  # 404 for good: shard 0 and shard 1 (shard 1 has nothing a retry fetches)
DUPLICATE = 20  # serves the same image as row 0 once it recovers


class Flaky:
    """Answers FLAKY's statuses while ``down``, the image once up."""

    def __init__(self) -> None:
        self.down = True
        self.requests: dict[int, int] = {}

    def handler(self, row: int):
        async def handle(request: web.Request) -> web.StreamResponse:
            self.requests[row] = self.requests.get(row, 0) + 1
            if self.down:
                return web.Response(status=FLAKY[row], text="try later")
            return web.Response(body=jpeg(0 if row == DUPLICATE else row), content_type="image/jpeg")
        return handle


@contextlib.contextmanager
def flaky_server(tmp_path: Path):
    """The server (FLAKY down, DEAD dead) and a URL list of its ROWS images."""
    flaky = Flaky()
    files = {f"{i}.jpg": jpeg(i) for i in range(ROWS) if i not in FLAKY and i not in DEAD}
    with LocalServer(files, {f"{i}.jpg": flaky.handler(i) for i in FLAKY}) as server:
        urls = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": [server.url(f"{i}.jpg") for i in range(ROWS)],
                                 "caption": [f"picture {i}" for i in range(ROWS)]}), urls)
        yield flaky, urls


def job_data(urls: Path, out: str, **sections) -> dict:
    return {"name": "flaky", "input": {"files": [str(urls)]},
            "download": {"image_size": 32, "allow_private_addresses": True, "timeout": 5, "retries": 0},
            "output": {"dir": out, "samples_per_shard": 8},
            "execution": {"engine": "local", "progress": False}, **sections}


@pytest.fixture
def flaky_job(tmp_path):
    with flaky_server(tmp_path) as (flaky, urls):
        job = tmp_path / "job.yaml"
        job.write_text(json.dumps(job_data(urls, str(tmp_path / "out"))))
        assert run_job(load_job(job)).ok
        yield tmp_path / "out", flaky, job


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def rows(out: Path) -> dict[str, dict]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet"))).to_pylist()
    return {r["caption"]: r for r in table}


def members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t}


def test_retry_fetches_the_passing_failures_and_rewrites_only_their_shards(flaky_job, capsys):
    out, flaky, _ = flaky_job
    before, before_rows = digests(out), rows(out)
    old_members = {n: members(out / n) for n in ("00000.tar", "00002.tar")}
    assert {before_rows[f"picture {i}"]["error_kind"] for i in FLAKY} == {"http_status"}
    assert all(r["attempts"] == 1 and r["last_attempt"] is None for r in before_rows.values())
    flaky.down = False

    assert main(["retry", str(out), "--no-progress"]) == 0
    assert "retried 4 samples in 2 shards; 4 now succeed" in capsys.readouterr().out

    after, after_rows = digests(out), rows(out)
    # shard 1 held only a 404: not retried, its files are as they were
    assert {n: after[n] for n in after if n.startswith("00001")} == {n: before[n] for n in before if n.startswith("00001")}
    assert after["00000.tar"] != before["00000.tar"] and after["00002.tar"] != before["00002.tar"]
    for i in FLAKY:
        row = after_rows[f"picture {i}"]
        assert row["attempts"] == 2 and row["last_attempt"].endswith("+00:00"), row
        assert flaky.requests[i] == 2
        assert row["status"] == "success"
    # the default kinds leave a 404 alone
    for i in DEAD:
        assert after_rows[f"picture {i}"]["status"] == "failed_to_download"
        assert after_rows[f"picture {i}"]["attempts"] == 1 and after_rows[f"picture {i}"]["last_attempt"] is None
    # untouched samples of rewritten shards keep their tar members byte for byte
    for name, old in old_members.items():
        new = members(out / name)
        assert {m: new[m] for m in old} == old
        assert len(new) > len(old)
    # the totals, the index and the loader see the recovered samples
    manifest = json.loads((out / "manifest.json").read_text())
    successes = ROWS - len(DEAD)  # the duplicate of row 0 recovers too: no dedup in this job
    assert manifest["totals"]["successes"] == successes == sum(r["status"] == "success" for r in after_rows.values())
    assert manifest["retries"][-1]["rows"] == 4 and manifest["retries"][-1]["recovered"] == 4
    index = json.loads((out / "index.json").read_text())
    assert sum(s["nsamples"] for s in index["shardlist"]) == successes
    samples = list(ShardDataset(str(out), fields=["jpg", "txt"]))
    assert len(samples) == successes
    assert len(list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))) == successes


def test_a_second_retry_with_nothing_left_changes_no_shard(flaky_job):
    out, flaky, _ = flaky_job
    flaky.down = False
    assert main(["retry", str(out), "--no-progress"]) == 0
    before = digests(out)
    assert main(["retry", str(out), "--no-progress"]) == 0
    after = digests(out)
    assert {n for n in after if after[n] != before[n]} <= {"manifest.json"}


def test_kinds_choose_what_is_fetched_again(flaky_job, capsys):
    out, flaky, _ = flaky_job
    flaky.down = False
    assert main(["retry", str(out), "--kinds", "http_5xx", "--no-progress"]) == 0
    got = rows(out)
    assert got["picture 5"]["status"] == "failed_to_download" and got["picture 5"]["attempts"] == 1  # a 429
    assert got["picture 1"]["status"] == "success"
    assert main(["retry", str(out), "--kinds", "http_404", "--no-progress"]) == 0
    assert rows(out)["picture 2"]["attempts"] == 2  # fetched again, still dead
    assert main(["retry", str(out), "--kinds", "timeout,bogus"]) == 2
    assert "--kinds: 'bogus' is not a download failure kind" in capsys.readouterr().err


def test_a_retried_duplicate_of_a_written_sample_is_the_one_dropped(tmp_path):
    with flaky_server(tmp_path) as (flaky, urls):
        spec = load_job(data=job_data(urls, str(tmp_path / "out"), filters=[{"dedup_exact": {}}]))
        assert run_job(spec).ok
        flaky.down = False
        assert main(["retry", str(tmp_path / "out"), "--no-progress"]) == 0
    got = rows(tmp_path / "out")
    assert got["picture 0"]["status"] == "success"
    assert got[f"picture {DUPLICATE}"]["status"] == "filtered"
    assert got[f"picture {DUPLICATE}"]["error_kind"] == "dedup_exact"
    assert all(got[f"picture {i}"]["status"] == "success" for i in set(FLAKY) - {DUPLICATE})


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the job catches it."""


def test_a_kill_while_replacing_a_shard_is_finished_by_the_next_run(flaky_job, monkeypatch):
    out, flaky, job = flaky_job
    flaky.down = False
    real_write = Directory.write
    journal = {}

    def write(self, name, data):
        real_write(self, name, data)
        if name.endswith("_retry.tar"):
            journal[name] = data
        elif journal and name.endswith(".tar"):
            raise Killed  # the journal and the new tar are committed; parquet and stats are not

    monkeypatch.setattr(Directory, "write", write)
    with pytest.raises(Killed):
        main(["retry", str(out), "--no-progress"])
    monkeypatch.undo()
    (name, data), = journal.items()
    assert (out / name).exists()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        promised = {m.name: t.extractfile(m).read() for m in t}
    assert list(promised) == ["00000.tar", "00000.parquet", "00000_stats.json"]
    assert (out / "00000_stats.json").read_bytes() != promised["00000_stats.json"]  # the old stats, for now

    result = run_job(load_job(job))  # a plain resume: open() finishes the replacement first
    assert result.ok and result.shards_skipped == 3 and result.shards_written == 0
    assert not (out / name).exists()
    for file, content in promised.items():
        assert (out / file).read_bytes() == content, file
    assert rows(out)["picture 1"]["status"] == "success"
    # the next retry finishes shard 2, which the kill never reached
    assert main(["retry", str(out), "--no-progress"]) == 0
    assert rows(out)["picture 17"]["status"] == "success"


def without_time(out: Path) -> dict[str, object]:
    """Every shard file's content, with the retry's clock (last_attempt) taken out."""
    got: dict[str, object] = {}
    for p in sorted(out.glob("0*")):
        if p.suffix == ".tar":
            got[p.name] = {m: json.dumps({k: v for k, v in json.loads(d).items() if k != "last_attempt"})
                           if m.endswith(".json") else d for m, d in members(p).items()}
        elif p.suffix == ".parquet":
            got[p.name] = pq.read_table(p).drop(["last_attempt"]).to_pydict()
        else:
            got[p.name] = {k: v for k, v in json.loads(p.read_text()).items() if k not in ("timings", "files", "tar_bytes")}
    return got


def test_retry_on_ray_writes_what_local_writes(flaky_job, tmp_path):
    import shutil

    out, flaky, _ = flaky_job
    flaky.down = False
    shutil.copytree(out, tmp_path / "ray")
    assert main(["retry", str(out), "--no-progress"]) == 0
    assert main(["retry", str(tmp_path / "ray"), "--engine", "ray", "--no-progress"]) == 0
    assert without_time(tmp_path / "ray") == without_time(out)


def test_retry_on_an_object_store(tmp_path, s3):
    with flaky_server(tmp_path) as (flaky, urls):
        out = s3.url("out/flaky")
        assert run_job(load_job(data=job_data(urls, out))).ok
        before = {k: s3.client().get_object(Bucket="mmcurate-test", Key=k)["Body"].read() for k in s3.keys("out/flaky/")}
        flaky.down = False
        assert main(["retry", out, "--no-progress"]) == 0
    after = {k: s3.client().get_object(Bucket="mmcurate-test", Key=k)["Body"].read() for k in s3.keys("out/flaky/")}
    assert not [k for k in after if k.endswith("_retry.tar")]
    assert {k for k in after if after[k] != before.get(k)} == {
        f"out/flaky/{n}" for n in ("00000.tar", "00000.parquet", "00000_stats.json", "00002.tar", "00002.parquet",
                                   "00002_stats.json", "index.json", "manifest.json")}
    index = json.loads(after["out/flaky/index.json"])
    assert sum(s["nsamples"] for s in index["shardlist"]) == ROWS - len(DEAD)


def test_a_replaced_shard_keeps_no_file_its_new_stats_do_not_list(flaky_job):
    """A column file the old shard had and the new one has not (here: put there by hand) goes."""
    out, flaky, _ = flaky_job
    flaky.down = False
    (out / "00000.columns.arrow").write_bytes(b"old columns")
    (out / "00001.columns.arrow").write_bytes(b"not retried: left as it is")
    assert main(["retry", str(out), "--no-progress"]) == 0
    assert not (out / "00000.columns.arrow").exists()
    assert (out / "00001.columns.arrow").read_bytes() == b"not retried: left as it is"

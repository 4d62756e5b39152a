"""`mmcurate retry` on interleaved documents: a document is fetched again, whole, when one of its
images failed for a passing reason (503), whether the document was kept without that image or
dropped for too few images; a document whose images failed for good (404) is left as written."""
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from aiohttp import web

from helpers.jobs import jpeg
from pipeline.cli.main import main
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing.serve import LocalServer


class Flaky:
    def __init__(self) -> None:
        self.down = True
        self.requests = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.down:
            return web.Response(status=503, text="try later")
        return web.Response(body=jpeg(7), content_type="image/jpeg")


def documents(server):
    def image(name):
        return {"type": "image", "url": server.url(name)}
    return [
        # kept without its flaky image, which a retry brings back
        {"segments": [{"type": "text", "text": "one"}, image("a.jpg"), image("flaky1.jpg")]},
        # dropped: its one image is flaky (too_few_images), a retry keeps it
        {"segments": [{"type": "text", "text": "two"}, image("flaky2.jpg")]},
        # dropped for good: 404
        {"segments": [{"type": "text", "text": "three"}, image("gone.jpg")]},
    ]


def rows(out):
    return pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet"))).to_pylist()


def images(row):
    return [(s["status"], s.get("error_kind")) for s in json.loads(row["document"])["segments"] if s["type"] == "image"]


def test_retry_fetches_documents_whose_images_failed_for_a_passing_reason(tmp_path):
    flaky = Flaky()
    with LocalServer({"a.jpg": jpeg(1)}, {"flaky1.jpg": flaky.handle, "flaky2.jpg": flaky.handle}) as server:
        src = tmp_path / "docs.jsonl"
        src.write_text("".join(json.dumps({"document": d}) + "\n" for d in documents(server)))
        spec = {"name": "docs", "input": {"files": [str(src)]},
                "download": {"media": "document", "image_size": 32, "allow_private_addresses": True,
                             "timeout": 5, "retries": 0},
                "filters": [{"image_size": {"min_side": 8}}],
                "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 8},
                "execution": {"engine": "local", "progress": False}}
        assert run_job(load_job(data=spec)).ok
        out = tmp_path / "out"
        before = rows(out)
        assert [r["status"] for r in before] == ["success", "failed_to_download", "failed_to_download"]
        assert images(before[0]) == [("success", None), ("failed_to_download", "http_status")]
        assert images(before[2]) == [("failed_to_download", "http_status")]

        flaky.down = False
        seen = flaky.requests
        assert main(["retry", str(out), "--kinds", "http_5xx"]) == 0
        assert flaky.requests - seen == 2  # each flaky image once more; gone.jpg's document not retried

    after = rows(out)
    assert [r["status"] for r in after] == ["success", "success", "failed_to_download"]
    assert images(after[0]) == [("success", None), ("success", None)]
    assert images(after[1]) == [("success", None)]
    assert after[2] == before[2]
    assert [r["attempts"] for r in after] == [2, 2, 1] and after[2]["last_attempt"] is None
    assert [r["images_kept"] for r in after] == [2, 1, 0]
    (tar,) = out.glob("*.tar")
    with tarfile.open(tar) as tf:
        names = sorted(n for n in tf.getnames() if ".image_" in n)
    keys = [r["key"] for r in after]
    assert names == [f"{keys[0]}.image_000.jpg", f"{keys[0]}.image_001.jpg", f"{keys[1]}.image_000.jpg"]

"""The metadata filter: rules on published columns, run before the download (dropped rows are never
fetched), and an exact top_fraction threshold over the whole input, kept in the manifest."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from aiohttp import web
from helpers.jobs import N, jpeg

from filters import build_filters
from filters.metadata import top_threshold
from pipeline.core.config import ConfigError
from pipeline.job.build import build_stages
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing.serve import LocalServer


def kth_highest(values: np.ndarray, fraction: float) -> float:
    k = max(1, math.ceil(round(fraction * len(values), 9)))
    return float(np.sort(values)[::-1][k - 1])


@pytest.mark.parametrize("fraction", [0.3, 0.01, 0.5, 1.0])
def test_top_threshold_is_exact_with_ties_and_bounded_memory(fraction):
    rng = np.random.default_rng(7)
    # Ties on purpose (rounded), spread over chunks; a tiny histogram and hold cap force narrowing passes.
    values = np.round(rng.normal(0.3, 0.05, 20_000), 3)
    chunks = np.array_split(values, 37)
    passes = []

    def read():
        passes.append(1)
        yield from chunks

    threshold, rows = top_threshold(read, fraction, buckets=8, max_held=300)
    assert rows == len(values)
    assert threshold == kth_highest(values, fraction)
    n, k = len(values), max(1, math.ceil(round(fraction * len(values), 9)))
    assert threshold == np.quantile(values, (n - k + 0.5) / n, method="inverted_cdf")  # sorted[n - k]
    kept = values[values >= threshold]
    assert len(kept) >= math.ceil(round(fraction * len(values), 9))  # ties at the cut are kept
    assert (values[values < threshold] < kept.min()).all()
    assert len(passes) > 2  # it narrowed instead of holding every value


def test_top_threshold_all_equal_and_empty():
    same = [np.full(1000, 0.5)] * 5
    assert top_threshold(lambda: iter(same), 0.3, buckets=4, max_held=10) == (0.5, 5000)
    assert top_threshold(lambda: iter([np.array([])]), 0.3) == (None, 0)


@pytest.mark.parametrize("options, message", [
    ({"min": 0.3}, "column: required"),
    ({"column": "s"}, "set one rule"),
    ({"column": "s", "min": 0.1, "top_fraction": 0.3}, "one rule per entry"),
    ({"column": "s", "top_fraction": 1.5}, "top_fraction: must be in (0, 1]"),
    ({"column": "s", "values": []}, "values: at least one"),
])
def test_bad_options_name_the_entry(options, message):
    with pytest.raises(ConfigError, match=r"filters\[0\]\.metadata\..*") as e:
        build_filters([{"metadata": options}])
    assert message in str(e.value)


def test_rules_missing_values_and_kinds():
    stage, = build_filters([{"metadata": {"column": "lang", "values": ["en", "de"]}}])
    batch = {"key": list("abcd"), "status": ["pending"] * 4, "error_kind": [None] * 4,
             "error_message": [None] * 4, "files": [{} for _ in range(4)], "lang": ["en", "fr", None, "de"]}
    stage.process(batch)
    assert batch["status"] == ["pending", "filtered", "filtered", "pending"]
    assert batch["error_kind"][1:3] == ["metadata:lang", "metadata:lang"]
    assert "missing" in batch["error_message"][2]


class CountingServer:
    """The helpers' images on 127.0.0.1, counting the requests per path."""

    def __init__(self):
        self.hits: Counter = Counter()
        files = {f"{i}.jpg": jpeg(i) for i in range(N)}

        def handler(path):
            async def answer(request):
                self.hits[path] += 1
                return web.Response(body=files[path], content_type="image/jpeg")
            return answer
        self.server = LocalServer(handlers={p: handler(p) for p in files})

    def __enter__(self):
        self.server.__enter__()
        return self

    def __exit__(self, *exc):
        self.server.__exit__(*exc)


def write_job(tmp_path, srv, filters, rows=40, scores=None):
    scores = scores if scores is not None else [round((i * 37 % 40) / 40, 3) for i in range(rows)]
    pq.write_table(pa.table({"url": [srv.server.url(f"{i}.jpg") for i in range(rows)],
                             "caption": [f"picture {i}" for i in range(rows)], "score": scores}),
                   tmp_path / "in.parquet")
    data = {"input": {"files": [str(tmp_path / "in.parquet")]}, "filters": filters,
            "download": {"image_size": 32, "allow_private_addresses": True, "timeout": 5, "concurrency": 4},
            "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 8},
            "execution": {"engine": "local", "progress": False}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    return load_job(tmp_path / "job.yaml"), scores


def rows_by_url(out):
    return {r["url"].rsplit("/", 1)[1]: r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}


def test_metadata_filter_runs_before_download_and_filtered_rows_are_never_fetched(tmp_path):
    with CountingServer() as srv:
        spec, scores = write_job(tmp_path, srv, [{"metadata": {"column": "score", "min": 0.5}}])
        assert [s.name for s in build_stages(spec)][:2] == ["metadata", "download"]
        result = run_job(spec)
    rows = rows_by_url(tmp_path / "out")
    assert len(rows) == 40
    for i, score in enumerate(scores):
        row = rows[f"{i}.jpg"]
        if score < 0.5:
            assert (row["status"], row["error_kind"]) == ("filtered", "metadata:score")
            assert srv.hits[f"{i}.jpg"] == 0
        else:
            assert row["status"] == "success" and srv.hits[f"{i}.jpg"] == 1
    assert result.error_kinds["metadata:score"] == sum(s < 0.5 for s in scores)


def test_top_fraction_is_exact_over_the_input_stored_and_reused_on_resume(tmp_path):
    rng = np.random.default_rng(3)
    scores = [float(v) for v in np.round(rng.uniform(0, 1, 40), 1)]  # many ties
    scores[5] = None  # a missing value: rejected, and not counted in the fraction
    with CountingServer() as srv:
        spec, _ = write_job(tmp_path, srv, [{"metadata": {"column": "score", "top_fraction": 0.3}}], scores=scores)
        run_job(spec)
        numbers = np.array([s for s in scores if s is not None])
        expected = kth_highest(numbers, 0.3)
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert manifest["stage_state"]["metadata"]["threshold"] == expected
        assert manifest["stage_state"]["metadata"]["rows"] == 39
        rows = rows_by_url(tmp_path / "out")
        kept = {i for i, s in enumerate(scores) if s is not None and s >= expected}
        assert {i for i in range(40) if rows[f"{i}.jpg"]["status"] == "success"} == kept
        assert "missing" in rows["5.jpg"]["error_message"]
        assert set(srv.hits) == {f"{i}.jpg" for i in kept}

        # A resumed run takes the threshold from the manifest, not from a new pass.
        manifest["stage_state"]["metadata"]["threshold"] = 0.9
        (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
        for f in (tmp_path / "out").iterdir():
            if f.name != "manifest.json":
                f.unlink()
        run_job(spec)
    rows = rows_by_url(tmp_path / "out")
    assert {i for i in range(40) if rows[f"{i}.jpg"]["status"] == "success"} == \
        {i for i, s in enumerate(scores) if s is not None and s >= 0.9}


def test_a_column_not_in_the_input_fails_before_anything_is_written(tmp_path):
    with CountingServer() as srv:
        spec, _ = write_job(tmp_path, srv, [{"metadata": {"column": "punsafe", "max": 0.5}}])
        with pytest.raises(ConfigError, match=r"input.files: .*in.parquet has no column 'punsafe'"):
            run_job(spec)
    assert not (tmp_path / "out").exists() and not srv.hits


def test_catalog_columns_reach_the_filter(tmp_path):
    """A card's normalised published column (COYO's clip_similarity) is what the rule reads."""
    with CountingServer() as srv:
        pq.write_table(pa.table({"id": list(range(16)), "url": [srv.server.url(f"{i}.jpg") for i in range(16)],
                                 "text": [f"c{i}" for i in range(16)], "width": [100] * 16, "height": [100] * 16,
                                 "clip_similarity_vitb32": [i / 16 for i in range(16)]}), tmp_path / "part.parquet")
        data = {"input": {"files": [str(tmp_path / "part.parquet")], "catalog": "coyo-700m"},
                "filters": [{"metadata": {"column": "clip_similarity", "top_fraction": 0.25}}],
                "download": {"image_size": 32, "allow_private_addresses": True},
                "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 8},
                "execution": {"engine": "local", "progress": False}}
        run_job(load_job(data=data))
    assert set(srv.hits) == {f"{i}.jpg" for i in range(12, 16)}

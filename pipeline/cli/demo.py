"""``mmcurate demo``: the whole pipeline offline, in a few minutes.

A server on 127.0.0.1 serves bundled synthetic images with captions (some deliberately
mismatched, some exact duplicates, a few dead or hostile links) -> download -> caption, exact-dedup
and CLIP filters with the project's tiny CLIP -> text and image (VQ) tokenization -> shards ->
a few batches streamed back through the loader -> a printed summary and the HTML report.
"""
from __future__ import annotations

import io
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.cli.inspect import render, summarize
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.sinks.webdataset import read_status_tables
from pipeline.testing import synthetic
from pipeline.testing.assets import DEMO_JOB, HERE
from pipeline.testing.serve import LocalServer

N_IMAGES = 400
MISMATCHED = 0.2   # share of captions replaced by another image's caption
DUPLICATES = 0.05  # share of URLs serving a byte-identical copy of an earlier image


def demo_data(n: int = N_IMAGES, seed: int = 0) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """Files to serve and the URL rows, each with what the demo knows about it (its truth)."""
    rng = random.Random(seed)
    pairs = synthetic.make_pairs(n, seed=seed, size=96)
    files: dict[str, bytes] = {}
    rows: list[dict[str, Any]] = []
    for i, (image, caption) in enumerate(pairs):
        side = rng.choice([80, 96, 128, 160])  # square: a centre crop must not cut the shape's position off
        buf = io.BytesIO()
        image.resize((side, side)).save(buf, "JPEG", quality=92)
        path = f"img/{i:05d}.jpg"
        truth = "matched"
        if i > 10 and rng.random() < DUPLICATES:
            files[path] = files[f"img/{rng.randrange(i):05d}.jpg"]
            truth = "duplicate"
        else:
            files[path] = buf.getvalue()
        if truth == "matched" and rng.random() < MISMATCHED:
            caption, truth = pairs[rng.randrange(n)][1], "mismatched"
        rows.append({"path": path, "caption": caption, "truth": truth})
    files["page.html"] = b"<!doctype html><html><body>not an image</body></html>"
    rows += [{"path": "missing.jpg", "caption": "a dead link on the demo server", "truth": "dead"},
             {"path": "page.html", "caption": "an html page served with status 200", "truth": "dead"}]
    return files, rows


def _rooted(node: Any) -> Any:
    """Model paths in the demo job are relative to this package: make them absolute."""
    if isinstance(node, dict):
        return {k: _rooted(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_rooted(v) for v in node]
    if isinstance(node, str) and node.startswith("models/"):
        return str(HERE / node)
    return node


def stream_back(out_dir: Path, batches: int = 3) -> list[str]:
    """Read a few batches back through the trainer-facing loader."""
    from pipeline.loader import Loader, ShardDataset

    dataset = ShardDataset(str(out_dir), fields={"image": "jpg", "text_ids": "text_ids.npy",
                                                 "image_ids": "image_ids.npy", "caption": "txt"},
                           batch_size=16, shuffle=True, seed=0)
    lines = [f"loader: {dataset.num_samples} samples in {dataset.num_batches} batches of 16 per epoch"]
    def shape(value: Any) -> str:  # variable-length fields (text ids) come as lists of tensors
        return str(tuple(value.shape)) if hasattr(value, "shape") else f"{len(value)} x variable length"

    for n, batch in enumerate(Loader(dataset, num_workers=0)):
        if n == batches:
            break
        lines.append(f"  batch {n}: image {shape(batch['image'])} {batch['image'].dtype}, text_ids "
                     f"{shape(batch['text_ids'])}, image_ids {shape(batch['image_ids'])} {batch['image_ids'].dtype}; "
                     f"e.g. {batch['caption'][0]!r}")
    return lines


def filter_quality(out_dir: Path, rows: list[dict[str, Any]], urls: list[str]) -> list[str]:
    """How the filters did against what the demo knows about each row."""
    table = read_status_tables(out_dir, ["url", "status", "error_kind"]).to_pydict()
    truth = {u: r["truth"] for u, r in zip(urls, rows)}
    lines = []
    for kind, label in (("mismatched", "mismatched captions"), ("duplicate", "duplicate images"),
                        ("matched", "matched captions")):
        mine = [i for i, u in enumerate(table["url"]) if truth[u] == kind]
        kept = sum(table["status"][i] == "success" for i in mine)
        by = sorted({table["error_kind"][i] for i in mine if table["error_kind"][i]})
        lines.append(f"  {label:<20} {len(mine):>4} rows, {kept:>4} kept"
                     + (f"; removed by {', '.join(by)}" if by else ""))
    return lines


def run_demo(out: str = "out/demo", keep: bool = False) -> int:
    out_dir = Path(out)
    if out_dir.exists() and not keep:
        shutil.rmtree(out_dir)
    files, rows = demo_data()
    url_file = out_dir / "input" / "urls.parquet"
    start = time.perf_counter()
    with LocalServer(files, content_type="image/jpeg") as server:
        urls = [server.url(r["path"]) for r in rows]
        url_file.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"url": urls, "caption": [r["caption"] for r in rows]}), url_file)
        data = _rooted(yaml.safe_load(DEMO_JOB.read_text()))
        data["input"]["files"] = [str(url_file)]
        data["output"]["dir"] = str(out_dir / "shards")
        spec = load_job(data=data)
        print(f"demo: serving {len(rows)} URLs on 127.0.0.1:{server.port} ({MISMATCHED:.0%} of captions "
              f"mismatched, ~{DUPLICATES:.0%} duplicate images, 2 bad links); job {spec.name!r} on "
              f"{spec.execution.engine} into {spec.output.dir}")
        result = run_job(spec)
    shards = Path(spec.output.dir)
    print()
    print(render(summarize(shards, n=3)))
    print("\nfilters against the truth the demo knows:")
    print("\n".join(filter_quality(shards, rows, urls)))
    print()
    print("\n".join(stream_back(shards)))
    from pipeline.cli.report import write_report

    report = write_report(shards, out_dir / "report.html")
    print(f"\nreport: {report}\ndemo finished in {time.perf_counter() - start:.0f} s")
    return 0 if result.ok else 1

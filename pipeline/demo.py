"""``mmcurate demo``: the whole flow offline. A server on 127.0.0.1 serves bundled synthetic
images (plus a few dead and hostile links), the demo job downloads them into shards, and the
result is inspected."""
from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import synthetic
from .inspection import render, summarize
from .job import run_job
from .serve import LocalServer
from .spec import load_job

DEMO_JOB = Path(__file__).resolve().parent.parent / "jobs" / "demo.yaml"
N_IMAGES = 240


def demo_files(n: int = N_IMAGES, seed: int = 0) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    """Synthetic JPEGs of varied sizes, their captions, and a few links that must fail."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    rows: list[tuple[str, str]] = []
    for i, (image, caption) in enumerate(synthetic.make_pairs(n, seed=seed, size=rng.choice([96, 128]))):
        w, h = rng.choice([(96, 96), (160, 120), (120, 200), (256, 192)])
        buf = io.BytesIO()
        image.resize((w, h)).save(buf, "JPEG", quality=90)
        files[f"img/{i:05d}.jpg"] = buf.getvalue()
        rows.append((f"img/{i:05d}.jpg", caption))
    files["page.html"] = b"<!doctype html><html><body>not an image</body></html>"
    rows += [("missing.jpg", "a dead link"), ("page.html", "an html page served with 200")]
    return files, rows


def run_demo(out: str = "out/demo", keep: bool = False) -> int:
    out_dir = Path(out)
    if out_dir.exists() and not keep:
        shutil.rmtree(out_dir)
    files, rows = demo_files()
    url_file = out_dir / "input" / "urls.parquet"
    with LocalServer(files, content_type="image/jpeg") as server:
        url_file.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"url": [server.url(p) for p, _ in rows], "caption": [c for _, c in rows]}), url_file)
        spec = load_job(DEMO_JOB, [f"input.files=[{url_file}]", f"output.dir={out_dir / 'shards'}"])
        print(f"demo: serving {len(rows)} URLs on 127.0.0.1:{server.port}; running job {spec.name!r} "
              f"({spec.execution.engine}) into {spec.output.dir}")
        result = run_job(spec)
    print()
    print(render(summarize(spec.output.dir, n=3)))
    return 0 if result.ok else 1

"""An interleaved-document job on the real Ray cluster (the session's ``ray_cluster``) from a driver
process: the OBELICS card's reader on a parquet in the published layout, every image fetched from
a local server (some dead), a per-image filter and job-wide dedup (an ordered stage) on the
documents' images. It writes the same bytes as the same job run locally."""
from __future__ import annotations

import yaml

from helpers.documents import document_job
from helpers.jobs import status_tables, tars
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing.documents import DEFAULT_DOCUMENTS, Doc, Img, document_images
from pipeline.testing.serve import LocalServer
from test_cluster import mmcurate, ok

# the default pages twice over, the copies under new page names: dedup_exact drops their images
DOCS = DEFAULT_DOCUMENTS + [Doc(f"copy-{d.page}", d.parts) for d in DEFAULT_DOCUMENTS] + [
    Doc("extra.html", ["One more page.", Img("cat.jpg"), Img("flour.jpg"), "With two known pictures."])]


def job(tmp_path, base, name, engine):
    spec = document_job(tmp_path, base, docs=DOCS, name=name, documents={"min_images": 1},
                        filters=[{"image_size": {"min_side": 16}}, {"dedup_exact": {}}],
                        output={"dir": str(tmp_path / name), "samples_per_shard": 3},
                        execution={"engine": engine, "progress": False})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_document_job_on_the_cluster_writes_what_local_writes(tmp_path, ray_cluster):
    with LocalServer(document_images(DOCS), content_type="image/jpeg") as server:
        base = server.url("").rstrip("/")
        assert run_job(load_job(job(tmp_path, base, "local", "local"))).ok
        ok(mmcurate(ray_cluster.env, job(tmp_path, base, "ray", "ray"), "execution.address=auto"))
    assert tars(tmp_path / "ray") and tars(tmp_path / "ray") == tars(tmp_path / "local")
    assert status_tables(tmp_path / "ray") == status_tables(tmp_path / "local")
    rows = [r for t in status_tables(tmp_path / "ray") for r in zip(t["status"], t["error_kind"])]
    assert ("filtered", "dedup_exact") in rows  # the copies' images were all seen before: dropped

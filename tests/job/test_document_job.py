"""A document job end to end (local engine): a jsonl of documents in our own form, images on a local
server (some dead, some too small for the job's image_size filter, applied per image), one tar
sample per kept document (KEY.json the document, KEY.txt its text, KEY.image_NNN.jpg in slot
order) read back by webdataset and our loader; the spec's documents section, --dry-run, inspect."""
import io
import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from pipeline.cli.inspect import render, summarize
from pipeline.cli.report import render as report_render
from pipeline.cli.report import summarize as report_summary
from pipeline.cli.main import main
from pipeline.core.config import ConfigError
from pipeline.core.document import SegmentStage
from pipeline.job.build import build_stages
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.loader import ShardDataset
from pipeline.testing.serve import LocalServer


def png(size):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (size % 256, 90, 160)).save(buf, "PNG")
    return buf.getvalue()


FILES = {"big1.png": png(200), "big2.png": png(220), "small.png": png(100)}


def document(server, *names):
    segs = []
    for n, name in enumerate(names):
        segs.append({"type": "text", "text": f"paragraph {n} about {name}"})
        segs.append({"type": "image", "url": server.url(name), "alt": name})
    return {"segments": segs, "lang": "en"}


@pytest.fixture()
def server():
    with LocalServer(FILES) as srv:
        yield srv


def job(tmp_path, server, docs, **documents):
    rows = tmp_path / "docs.jsonl"
    rows.write_text("".join(json.dumps({"url": f"https://pages.example/{i}", "document": d}) + "\n"
                            for i, d in enumerate(docs)))
    data = {"name": "docs", "input": {"files": [str(rows)]},
            "download": {"media": "document", "image_size": 64, "allow_private_addresses": True, "timeout": 5},
            "documents": documents, "filters": [{"image_size": {"min_side": 150}}],
            "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 8},
            "execution": {"engine": "local", "progress": False}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_document_job_writes_one_sample_per_document(tmp_path, server):
    docs = [document(server, "big1.png", "small.png", "dead.png"),   # kept: 1 image, 1 filtered, 1 dead
            document(server, "small.png", "small.png"),              # every image filtered: filtered by image_size
            document(server, "big2.png", "big1.png"),                # kept whole
            document(server, "dead.png")]                            # no image: too_few_images
    spec = load_job(job(tmp_path, server, docs))
    assert [type(s).__name__ for s in build_stages(spec, check=False)] == [
        "DocumentDownloadStage", "SegmentStage", "DocumentCountStage"]
    run_job(spec)
    out = tmp_path / "out"

    table = pq.read_table(out / "00000.parquet").to_pydict()
    assert table["status"] == ["success", "filtered", "success", "failed_to_download"]
    assert table["error_kind"] == [None, "image_size", None, "too_few_images"]
    assert table["images_total"] == [3, 2, 2, 1] and table["images_kept"] == [1, 0, 2, 0]
    stored = json.loads(table["document"][0])  # the status table holds the document as JSON text
    assert [s.get("status") for s in stored["segments"] if s["type"] == "image"] == [
        "success", "filtered", "failed_to_download"]

    samples = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000000", "000000002"]
    first, third = samples
    assert sorted(k for k in first if not k.startswith("__")) == ["image_000.jpg", "json", "txt"]
    assert sorted(k for k in third if not k.startswith("__")) == ["image_000.jpg", "image_001.jpg", "json", "txt"]
    meta = json.loads(first["json"])
    assert isinstance(meta["document"], dict) and meta["images_kept"] == 1
    images = [s for s in meta["document"]["segments"] if s["type"] == "image"]
    assert [(s["status"], s.get("error_kind"), s["url"].rsplit("/", 1)[1]) for s in images] == [
        ("success", None, "big1.png"), ("filtered", "image_size", "small.png"),
        ("failed_to_download", "http_status", "dead.png")]
    assert images[0]["member"] == "image_000.jpg" and images[0]["original_width"] == 200
    assert first["txt"].decode() == "paragraph 0 about big1.png\n\nparagraph 1 about small.png\n\nparagraph 2 about dead.png"
    with Image.open(io.BytesIO(third["image_001.jpg"])) as img:  # slot 1 is big1.png, resized to 64
        assert img.size == (64, 64)
    assert json.loads(third["json"])["document"]["segments"][3]["url"].endswith("/big1.png")

    loaded = list(ShardDataset(str(out), batch_size=None))
    assert [s["__key__"] for s in loaded] == ["000000000", "000000002"]
    assert tuple(loaded[1]["image_001.jpg"].shape) == (3, 64, 64)
    assert loaded[0]["json"]["document"]["segments"][1]["member"] == "image_000.jpg"

    summary = summarize(out)
    assert summary["successes"] == 2 and summary["examples"][0]["files"].keys() == {"image_000.jpg"}
    assert "image_000.jpg" in render(summary) and "1/3 images" in render(summary)


    report = report_summary(out)  # per image: sizes of the fetched ones; per document: words, slots
    size, words, slots = (report.histograms[k] for k in ("size", "caption", "images_total"))
    assert (size.total, int(size.kept.sum())) == (6, 3)  # 6 fetched (the dead have no size); kept: big1, big2, big1
    assert (words.total, int(words.kept.sum())) == (4, 2)
    assert (slots.total, int(slots.kept.sum())) == (4, 2)
    assert "Images per document" in report_render(report)


def test_all_images_and_min_images_come_from_the_documents_section(tmp_path, server):
    docs = [document(server, "big1.png", "small.png"), document(server, "big1.png", "big2.png")]
    run_job(load_job(job(tmp_path, server, docs, all_images=True)))
    table = pq.read_table(tmp_path / "out" / "00000.parquet").to_pydict()
    assert table["status"] == ["filtered", "success"] and table["error_kind"][0] == "image_size"

    docs = [document(server, "big1.png", "big2.png", "small.png"), document(server, "big1.png", "dead.png")]
    data = yaml.safe_load(job(tmp_path, server, docs, min_images=2).read_text())
    data["output"]["dir"] = str(tmp_path / "two")
    run_job(load_job(data=data))
    table = pq.read_table(tmp_path / "two" / "00000.parquet").to_pydict()
    assert table["status"] == ["success", "failed_to_download"] and table["error_kind"][1] == "too_few_images"
    assert table["images_kept"] == [2, 0]  # a dropped document keeps no image in the output


@pytest.mark.parametrize("documents, message", [
    ({"min_images": -1}, "documents.min_images: must be >= 0, got -1"),
    ({"max_images": 0}, "documents.max_images: must be > 0 or null, got 0"),
    ({"min_images": 3, "max_images": 2}, "documents.max_images: 2 is below min_images=3"),
    ({"keep": 1}, "documents.keep: unknown key"),
])
def test_bad_documents_options_name_the_key(tmp_path, server, documents, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_job(job(tmp_path, server, [], **documents))


def test_a_rerun_writes_the_same_bytes(tmp_path, server):
    docs = [document(server, "big1.png", "small.png", "dead.png"), document(server, "big2.png", "big1.png")]
    path = job(tmp_path, server, docs)
    data = yaml.safe_load(path.read_text())
    for name in ("a", "b"):
        data["output"]["dir"] = str(tmp_path / name)
        run_job(load_job(data=data))
    for name in ("00000.tar", "00000.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_dry_run_checks_a_document_job_and_a_file_without_documents_fails_naming_it(tmp_path, server, capsys):
    path = job(tmp_path, server, [document(server, "big1.png")])
    assert main(["run", str(path), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["download"]["media"] == "document"
    (tmp_path / "docs.jsonl").write_text(json.dumps({"url": "https://a.example/x.jpg", "caption": "a pair"}) + "\n")
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "docs.jsonl has none (columns: url, caption)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_stages_on_documents_run_on_their_views(tmp_path, server):
    data = yaml.safe_load(job(tmp_path, server, []).read_text())
    data["filters"] = [{"image_size": {"min_side": 10}}, {"caption": {"min_words": 2}}]
    stages = build_stages(load_job(data=data), check=False)
    assert [(s.name, getattr(s, "over", None)) for s in stages] == [
        ("download", None), ("image_size", "image"), ("caption", "document"), ("document_counts", None)]
    assert all(isinstance(s, SegmentStage) for s in stages[1:3])


@pytest.mark.parametrize("encoding", ["struct", "json text"])
def test_a_parquet_of_documents_without_page_urls_runs(tmp_path, server, encoding):
    import pyarrow as pa

    docs = [document(server, "big1.png", "dead.png"), document(server, "big2.png")]
    path = job(tmp_path, server, [])
    rows = tmp_path / "docs.parquet"
    column = [json.dumps(d) for d in docs] if encoding == "json text" else docs
    pq.write_table(pa.table({"document": column, "doc_id": ["a", "b"]}), rows)
    data = yaml.safe_load(path.read_text())
    data["input"] = {"files": [str(rows)], "save_additional_columns": ["doc_id"]}
    run_job(load_job(data=data))
    table = pq.read_table(tmp_path / "out" / "00000.parquet").to_pydict()
    assert table["status"] == ["success", "success"] and table["doc_id"] == ["a", "b"]
    assert table["images_total"] == [2, 1] and table["images_kept"] == [1, 1]
    samples = list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False))
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [["image_000.jpg", "json", "txt"]] * 2
    assert samples[1]["txt"].decode() == "paragraph 0 about big2.png"


def test_a_document_job_reads_an_interleaved_catalog_card(tmp_path, server):
    """OBELICS' published layout: parallel images/texts lists, metadata and general_metadata as JSON text."""
    import pyarrow as pa

    images = [[None, server.url("big1.png"), None, server.url("dead.png")], [server.url("big2.png"), None]]
    texts = [["intro", None, "middle", None], [None, "caption text"]]
    metadata = [json.dumps([None if u is None else {"alt_text": f"alt {n}", "src": u} for n, u in enumerate(doc)])
                for doc in images]
    general = [json.dumps({"url": f"https://pages.example/{i}"}) for i in range(2)]
    rows = tmp_path / "obelics.parquet"
    pq.write_table(pa.table({"images": images, "texts": texts, "metadata": metadata, "general_metadata": general}), rows)
    data = yaml.safe_load(job(tmp_path, server, []).read_text())
    data["input"] = {"catalog": "obelics", "files": [str(rows)]}
    data["filters"] = []
    path = tmp_path / "obelics.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--dry-run"]) == 0
    run_job(load_job(path))
    table = pq.read_table(tmp_path / "out" / "00000.parquet").to_pydict()
    assert table["status"] == ["success", "success"] and table["url"] == ["https://pages.example/0",
                                                                          "https://pages.example/1"]
    samples = list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False))
    first = json.loads(samples[0]["json"])["document"]["segments"]
    assert [(s["type"], s.get("status")) for s in first] == [("text", None), ("image", "success"), ("text", None),
                                                             ("image", "failed_to_download")]
    assert first[1]["alt"] == "alt 1" and first[1]["member"] == "image_000.jpg"
    assert samples[0]["txt"].decode() == "intro\n\nmiddle"
    assert sorted(k for k in samples[1] if not k.startswith("__")) == ["image_000.jpg", "json", "txt"]


def test_dry_run_refuses_documents_from_a_card_of_pairs(tmp_path, server, capsys):
    data = yaml.safe_load(job(tmp_path, server, [document(server, "big1.png")]).read_text())
    data["input"]["catalog"] = "cc3m"
    path = tmp_path / "cc3m.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "the cc3m card has no document reader" in capsys.readouterr().err

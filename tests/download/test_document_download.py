"""The document download stage: every image of every document fetched from a real local server
(some dead, some not images, one too small), each slot's outcome recorded in its segment, the
members image_NNN.jpg in slot order, and the document rule (min_images, all_images, max_images)."""
import hashlib
import io
import json

from aiohttp import web
from PIL import Image

from pipeline.core import schema
from pipeline.core.document import DocumentRule, image_slots
from pipeline.download.document import DocumentDownloadConfig, DocumentDownloadStage
from pipeline.download.image import ImageDownloadConfig
from pipeline.fetch import FetchConfig
from pipeline.media.resize import ResizeConfig
from pipeline.sources.shards import InputShard
from pipeline.testing.serve import LocalServer
from tests.helpers.jobs import jpeg


def tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


FILES = {"a.jpg": jpeg(1), "b.jpg": jpeg(2), "c.jpg": jpeg(3), "page.jpg": b"<html><body>not an image</body></html>",
         "tiny.jpg": tiny_jpeg()}


def document(*urls, text="a sentence"):
    segs = []
    for n, url in enumerate(urls):
        segs.append({"type": "text", "text": f"{text} {n}"})
        segs.append({"type": "image", "url": url, "alt": f"alt {n}"})
    return {"segments": segs, "source": "test"}


def batch_of(docs):
    n = len(docs)
    batch = {c: [None] * n for c in schema.STATUS_COLUMNS}
    batch.update({schema.KEY: [f"{i:09d}" for i in range(n)], schema.URL: [f"https://pages.example/{i}" for i in range(n)],
                  schema.STATUS: [schema.PENDING] * n, schema.FILES: [{} for _ in range(n)], schema.DOCUMENT: docs})
    return batch


def stage_for(rule=DocumentRule(min_images=0), max_images=None, concurrency=8, **image):
    fetch = FetchConfig(allow_private_addresses=True, timeout=5, concurrency=concurrency)
    config = ImageDownloadConfig(fetch=fetch, resize=ResizeConfig(image_size=32, min_image_size=16), **image)
    return DocumentDownloadStage(DocumentDownloadConfig(image=config, rule=rule, max_images=max_images))


def slots(batch, i):
    return image_slots(batch[schema.DOCUMENT][i])


def test_every_image_is_fetched_and_each_slot_records_its_outcome():
    with LocalServer(FILES) as srv:
        docs = [document(srv.url("a.jpg"), srv.url("dead.jpg"), srv.url("b.jpg"), srv.url("page.jpg"),
                         srv.url("tiny.jpg")),
                document(srv.url("c.jpg"), srv.url("a.jpg"))]
        batch = stage_for().process(batch_of(docs))
    first = slots(batch, 0)
    assert [s[schema.STATUS] for s in first] == [schema.SUCCESS, schema.FAILED_TO_DOWNLOAD, schema.SUCCESS,
                                                 schema.FAILED_TO_DOWNLOAD, schema.FAILED_TO_DECODE]
    assert [s[schema.ERROR_KIND] for s in first] == [None, "http_status", None, "not_media", "too_small"]
    assert "404" in first[1][schema.ERROR_MESSAGE]
    assert first[0]["member"] == "image_000.jpg" and first[2]["member"] == "image_002.jpg"
    assert "member" not in first[1] and first[1][schema.WIDTH] is None
    assert first[0][schema.SHA256] == hashlib.sha256(FILES["a.jpg"]).hexdigest()
    assert (first[0][schema.WIDTH], first[0][schema.HEIGHT]) == (32, 32)
    assert first[4][schema.ORIGINAL_WIDTH] == 8  # known for an image the size rule refused
    assert first[0]["url"].endswith("/a.jpg") and first[0]["alt"] == "alt 0"  # the reader's fields are kept
    assert sorted(batch[schema.FILES][0]) == ["image_000.jpg", "image_002.jpg"]
    for j in (0, 2):
        with Image.open(io.BytesIO(batch[schema.FILES][0][f"image_{j:03d}.jpg"])) as img:
            assert img.size == (32, 32)
    assert sorted(batch[schema.FILES][1]) == ["image_000.jpg", "image_001.jpg"]
    assert batch[schema.STATUS] == [schema.PENDING, schema.PENDING]  # settled to success by the executor
    assert batch["images_total"] == [5, 2] and batch["images_kept"] == [2, 2]
    assert batch[schema.ATTEMPTS] == [1, 1]


def test_an_image_the_reader_marked_invalid_is_not_fetched_and_the_input_rows_stay_as_read():
    asked = []

    async def counted(request):
        asked.append(request.path)
        return web.Response(body=FILES["a.jpg"])

    with LocalServer(FILES, handlers={"counted.jpg": counted}) as srv:
        doc = document(srv.url("counted.jpg"), srv.url("b.jpg"))
        doc["segments"][1].update({schema.STATUS: schema.INVALID_INPUT, schema.ERROR_KIND: "bad_scheme",
                                   schema.ERROR_MESSAGE: "only http(s) URLs are fetched"})
        shard = InputShard(0, batch_of([doc]))
        before = json.dumps(shard.batch[schema.DOCUMENT])
        batch = stage_for().process(shard.fresh_batch())
    assert asked == []
    assert [s[schema.STATUS] for s in slots(batch, 0)] == [schema.INVALID_INPUT, schema.SUCCESS]
    assert slots(batch, 0)[0][schema.ERROR_KIND] == "bad_scheme"
    assert list(batch[schema.FILES][0]) == ["image_001.jpg"]
    assert json.dumps(shard.batch[schema.DOCUMENT]) == before  # a retried shard starts from the rows as read


def test_min_images_drops_a_document_with_too_few_images_left():
    with LocalServer(FILES) as srv:
        docs = [document(srv.url("a.jpg"), srv.url("dead.jpg"), srv.url("gone.jpg")),
                document(srv.url("a.jpg"), srv.url("b.jpg"), srv.url("dead.jpg"))]
        batch = stage_for(DocumentRule(min_images=2)).process(batch_of(docs))
    assert batch[schema.STATUS] == [schema.FAILED_TO_DOWNLOAD, schema.PENDING]
    assert batch[schema.ERROR_KIND][0] == "too_few_images" and "min_images=2" in batch[schema.ERROR_MESSAGE][0]
    assert batch[schema.FILES][0] == {} and batch["images_kept"] == [0, 2]
    # the kept document keeps its dead image as a slot with its status
    assert [s[schema.STATUS] for s in slots(batch, 1)] == [schema.SUCCESS, schema.SUCCESS, schema.FAILED_TO_DOWNLOAD]


def test_all_images_drops_a_document_if_any_image_failed():
    with LocalServer(FILES) as srv:
        docs = [document(srv.url("a.jpg"), srv.url("b.jpg"), srv.url("dead.jpg")),
                document(srv.url("a.jpg"), srv.url("c.jpg"))]
        batch = stage_for(DocumentRule(min_images=1, all_images=True)).process(batch_of(docs))
    assert batch[schema.STATUS] == [schema.FAILED_TO_DOWNLOAD, schema.PENDING]
    assert batch[schema.ERROR_KIND][0] == "too_few_images" and "1 of its 3 images failed" in batch[schema.ERROR_MESSAGE][0]
    assert sorted(batch[schema.FILES][1]) == ["image_000.jpg", "image_001.jpg"]


def test_a_document_over_max_images_is_not_fetched_and_bad_documents_fail_alone():
    asked = []

    async def counted(request):
        asked.append(request.path)
        return web.Response(body=FILES["a.jpg"])

    with LocalServer(FILES, handlers={"counted.jpg": counted}) as srv:
        many = document(*[srv.url("counted.jpg")] * 3)
        as_text = json.dumps(document(srv.url("a.jpg")))  # a status table's JSON text is a document too
        no_url = {"segments": [{"type": "image", "alt": "a picture without its URL"}]}
        batch = stage_for(max_images=2).process(batch_of([many, {"no": "segments"}, "{not json", as_text, no_url]))
    assert asked == []
    assert (slots(batch, 4)[0][schema.STATUS], slots(batch, 4)[0][schema.ERROR_KIND]) == ("invalid_input", "missing_url")
    assert batch[schema.STATUS][:3] == [schema.INVALID_INPUT] * 3
    assert batch[schema.ERROR_KIND][:3] == ["malformed_row"] * 3
    assert "documents.max_images=2" in batch[schema.ERROR_MESSAGE][0]
    assert batch[schema.STATUS][3] == schema.PENDING and list(batch[schema.FILES][3]) == ["image_000.jpg"]


def test_verify_hash_reads_each_images_hash_from_its_segment():
    with LocalServer(FILES) as srv:
        doc = document(srv.url("a.jpg"), srv.url("b.jpg"), srv.url("c.jpg"))
        images = [s for s in doc["segments"] if s["type"] == "image"]
        images[0]["published"] = hashlib.sha256(FILES["a.jpg"]).hexdigest()
        images[1]["published"] = hashlib.sha256(b"other bytes").hexdigest()
        batch = stage_for(verify_hash="sha256", hash_col="published").process(batch_of([doc]))
    assert [s[schema.ERROR_KIND] for s in slots(batch, 0)] == [None, "hash_mismatch", None]


def test_one_concurrency_budget_across_the_shards_images():
    state = {"now": 0, "most": 0}

    async def slow(request):
        import asyncio

        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        await asyncio.sleep(0.05)
        state["now"] -= 1
        return web.Response(body=FILES["a.jpg"])

    with LocalServer(FILES, handlers={f"s{i}.jpg": slow for i in range(8)}) as srv:
        docs = [document(*[srv.url(f"s{i}.jpg") for i in range(d * 4, d * 4 + 4)]) for d in range(2)]
        batch = stage_for(concurrency=3).process(batch_of(docs))
    assert batch["images_kept"] == [4, 4]
    assert state["most"] <= 3

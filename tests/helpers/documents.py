"""Interleaved-document rows as the download stage leaves them (pipeline/core/document.py), for
the tests of the stages that run on documents."""
from __future__ import annotations

import hashlib
import io

from pipeline.core import document as doc
from pipeline.core import schema


def jpeg(image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def document_batch(documents: list[list], shard_id: int = 0) -> dict:
    """A batch of document rows of shard ``shard_id``. Each document is a list of segments in
    reading order: a ``str`` is a text segment, a PIL image a downloaded image (member
    ``image_NNN.jpg``, its sizes and sha256), ``(image, text_index)`` one matched to segment
    ``text_index`` (MMC4), ``None`` a dead image (HTTP 404, no member). Slots count every image."""
    n = len(documents)
    batch = {c: [None] * n for c in schema.STATUS_COLUMNS}
    batch.update({schema.KEY: [schema.make_key(shard_id, i, 100) for i in range(n)],
                  schema.STATUS: [schema.PENDING] * n, schema.FILES: [{} for _ in range(n)],
                  schema.URL: [f"https://example.com/{shard_id}/{i}" for i in range(n)], schema.DOCUMENT: []})
    for i, parts in enumerate(documents):
        segments, slot = [], 0
        for part in parts:
            if isinstance(part, str):
                segments.append({"type": doc.TEXT, "text": part})
                continue
            seg = {"type": doc.IMAGE, "url": f"https://example.com/{shard_id}/{i}/{slot}.jpg"}
            if isinstance(part, tuple):
                part, seg["text_index"] = part
            if part is None:
                seg.update({schema.STATUS: schema.FAILED_TO_DOWNLOAD, schema.ERROR_KIND: "http_status",
                            schema.ERROR_MESSAGE: "HTTP 404"})
            else:
                data, member = jpeg(part), doc.image_member(slot, "jpg")
                batch[schema.FILES][i][member] = data
                seg.update({schema.STATUS: schema.SUCCESS, schema.WIDTH: part.width, schema.HEIGHT: part.height,
                            schema.ORIGINAL_WIDTH: part.width, schema.ORIGINAL_HEIGHT: part.height,
                            schema.SHA256: hashlib.sha256(data).hexdigest(), doc.MEMBER: member})
            segments.append(seg)
            slot += 1
        batch[schema.DOCUMENT].append({"segments": segments})
    return batch


def document_job(tmp_path, base_url: str, card: str = "obelics", docs=None, **sections) -> dict:
    """A document job (as data) over ``card``'s published layout written to ``tmp_path`` with image
    URLs under ``base_url`` (the default corpus, or ``docs``): 32 px, local engine, into
    ``tmp_path/out``; ``sections`` are set over it (``filters=[...]``, ``output={...}``)."""
    from pipeline.testing.documents import DEFAULT_DOCUMENTS, write_mmc4_jsonl, write_obelics_parquet

    writer, name = {"obelics": (write_obelics_parquet, "train-00000-of-00001.parquet"),
                    "mmc4": (write_mmc4_jsonl, "docs_no_face_shard_0_v3.jsonl")}[card]
    files = [str(writer(tmp_path / name, base_url, docs or DEFAULT_DOCUMENTS))]
    return {"name": "docs", "input": {"catalog": card, "files": files},
            "download": {"media": "document", "image_size": 32, "allow_private_addresses": True, "timeout": 5},
            "output": {"dir": str(tmp_path / "out")}, "execution": {"engine": "local", "progress": False},
            **sections}

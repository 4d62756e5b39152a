"""Small interleaved corpora in their published layouts, images on a local server, some dead.

A corpus here is a list of :class:`Doc`: a page and its parts in reading order, each a sentence
(``str``) or an :class:`Img`. The writers put it in the layout each dataset publishes, with its
exact column names and encodings, image URLs under ``base_url``:

* :func:`write_obelics_parquet` -- OBELICS: ``images`` / ``texts`` parallel lists (one non-null
  per position), ``metadata`` a JSON string of per-position records (null at texts) and
  ``general_metadata`` a JSON string for the page.
* :func:`write_mmc4_jsonl` -- MMC4 (``mmc4-ff``): one JSON object per line with ``text_list``,
  ``image_info`` ({raw_url, image_name, matched_text_index, matched_sim, face_detections}),
  ``similarity_matrix`` (images x sentences), ``url``; optionally zipped like AI2's shards. Each
  image is matched to the sentence that follows it (the last one when none follows).
* :func:`write_omnicorpus_parquet` -- OmniCorpus-CC: ``images`` / ``texts`` parallel lists and
  ``metadata`` / ``general_metadata`` as Parquet structs.

:func:`document_images` gives the bodies to serve (dead images are left out: a 404), and
:func:`reading_order` what a reader must give back.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


@dataclass(frozen=True)
class Img:
    name: str                   # served at BASE_URL/name
    alt: Optional[str] = None   # the alt-text (OBELICS)
    dead: bool = False          # not served: its URL answers 404


@dataclass
class Doc:
    page: str                   # the page's URL is BASE_URL/page
    parts: list[Union[str, Img]] = field(default_factory=list)

    def sentences(self) -> list[str]:
        return [p for p in self.parts if isinstance(p, str)]

    def images(self) -> list[Img]:
        return [p for p in self.parts if isinstance(p, Img)]


# Four pages: a dead image among live ones, two images before one sentence, text only, all dead.
DEFAULT_DOCUMENTS: list[Doc] = [
    Doc("garden.html", [Img("cat.jpg", alt="a grey cat"), "The cat sleeps in the sun.",
                        "Later the dog came by.", Img("dog.jpg"), "It barked at the gate.",
                        Img("gone.jpg", alt="a removed photo", dead=True), "Then it rained."]),
    Doc("kitchen.html", ["How to bake bread.", Img("flour.jpg"), Img("dough.jpg", alt="dough"),
                         "Mix flour and water, then knead.", Img("loaf.jpg"), "Bake for forty minutes."]),
    Doc("notes.html", ["A page with text only.", "It has two sentences."]),
    Doc("broken.html", [Img("lost1.jpg", dead=True), "Both pictures of this page are gone.",
                        Img("lost2.jpg", dead=True), "Nothing was saved."]),
]


def _url(base_url: str, name: str) -> str:
    return f"{base_url.rstrip('/')}/{name}"


def document_images(docs: list[Doc] = DEFAULT_DOCUMENTS, size: int = 48) -> dict[str, bytes]:
    """JPEG bodies of the live images, by name (a distinct colour each), for ``LocalServer``."""
    out = {}
    for d, doc in enumerate(docs):
        for j, img in enumerate(doc.images()):
            if not img.dead:
                colour = ((70 * d + 40) % 256, (50 * j + 90) % 256, (30 * d + 60 * j) % 256)
                buf = io.BytesIO()
                Image.new("RGB", (size + 8 * j, size), colour).save(buf, "JPEG", quality=90)
                out[img.name] = buf.getvalue()
    return out


def reading_order(doc: Doc, base_url: str) -> list[tuple[str, str]]:
    """``[("text", sentence) | ("image", url), ...]``: the document a reader must give back."""
    return [("text", p) if isinstance(p, str) else ("image", _url(base_url, p.name)) for p in doc.parts]


# -- OBELICS -----------------------------------------------------------------------------------------

def write_obelics_parquet(path: Union[str, Path], base_url: str, docs: list[Doc] = DEFAULT_DOCUMENTS) -> Path:
    images, texts, metadata, general = [], [], [], []
    for n, doc in enumerate(docs):
        page = _url(base_url, doc.page)
        images.append([_url(base_url, p.name) if isinstance(p, Img) else None for p in doc.parts])
        texts.append([p if isinstance(p, str) else None for p in doc.parts])
        metadata.append(json.dumps([_obelics_image(page, base_url, p) if isinstance(p, Img) else None
                                    for p in doc.parts]))
        general.append(json.dumps({"url": page, "warc_filename": f"crawl-data/CC-MAIN-2023-06/segment/{n}.warc.gz",
                                   "warc_record_offset": 1000 * n, "warc_record_length": 900 + n}))
    table = pa.table({"images": pa.array(images, pa.list_(pa.string())), "metadata": pa.array(metadata, pa.string()),
                      "general_metadata": pa.array(general, pa.string()),
                      "texts": pa.array(texts, pa.list_(pa.string()))})
    return _write_parquet(table, path)


def _obelics_image(page: str, base_url: str, img: Img) -> dict:
    record = {"document_url": page, "unformatted_src": img.name, "src": _url(base_url, img.name)}
    if img.alt is not None:
        record["alt_text"] = img.alt
    return record


# -- MMC4 ----------------------------------------------------------------------------------------------

def mmc4_document(doc: Doc, base_url: str) -> dict:
    """One MMC4 JSONL object; each image matched to the sentence after it (else the last one)."""
    sentences, info, k = doc.sentences(), [], 0
    for part in doc.parts:
        if isinstance(part, str):
            k += 1
            continue
        match = min(k, len(sentences) - 1)
        info.append({"face_detections": None, "image_name": hashlib.sha1(part.name.encode()).hexdigest()[:12] + ".jpg",
                     "matched_sim": round(0.2 + 0.01 * len(info), 4), "matched_text_index": match,
                     "raw_url": _url(base_url, part.name)})
    matrix = [[round(0.3 if s == i["matched_text_index"] else 0.15, 4) for s in range(len(sentences))] for i in info]
    return {"image_info": info, "similarity_matrix": matrix, "text_list": sentences,
            "url": _url(base_url, doc.page), "could_have_url_duplicate": 0}


def write_mmc4_jsonl(path: Union[str, Path], base_url: str, docs: list[Doc] = DEFAULT_DOCUMENTS,
                     zipped: bool = False) -> Path:
    """``path`` (``.jsonl``), or with ``zipped`` ``path`` holding one ``.jsonl`` member, as AI2 shipped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(mmc4_document(d, base_url)) + "\n" for d in docs)
    if zipped:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(path.name.removesuffix(".zip"), text)
    else:
        path.write_text(text)
    return path


# -- OmniCorpus-CC --------------------------------------------------------------------------------------

_OMNI_IMAGE = pa.struct([("aesthetic_prob", pa.float64()), ("bytes", pa.int64()), ("d_hash", pa.string()),
                         ("d_hash_dup_count", pa.int64()), ("height", pa.int64()), ("img_url_sha", pa.string()),
                         ("p_hash", pa.string()), ("p_hash_dup_count", pa.int64()), ("unsafe_prob", pa.float64()),
                         ("width", pa.int64())])
_OMNI_PAGE = pa.struct([("domain", pa.list_(pa.string())), ("fluency_prob", pa.float64()), ("id", pa.string()),
                        ("non_advertisement_prob", pa.float64()), ("politics_prob", pa.float64()),
                        ("porn_prob", pa.float64()), ("toxic_prob", pa.float64()), ("url", pa.string())])


def write_omnicorpus_parquet(path: Union[str, Path], base_url: str, docs: list[Doc] = DEFAULT_DOCUMENTS) -> Path:
    images, texts, metadata, general = [], [], [], []
    for n, doc in enumerate(docs):
        images.append([_url(base_url, p.name) if isinstance(p, Img) else None for p in doc.parts])
        texts.append([p if isinstance(p, str) else None for p in doc.parts])
        metadata.append([_omni_image(base_url, p, j) if isinstance(p, Img) else None for j, p in enumerate(doc.parts)])
        general.append({"domain": ["example"], "fluency_prob": 0.9, "id": f"doc-{n:04d}",
                        "non_advertisement_prob": 0.8, "politics_prob": 0.01, "porn_prob": 0.0, "toxic_prob": 0.01,
                        "url": _url(base_url, doc.page)})
    table = pa.table({"general_metadata": pa.array(general, _OMNI_PAGE),
                      "images": pa.array(images, pa.list_(pa.string())),
                      "texts": pa.array(texts, pa.list_(pa.string())),
                      "metadata": pa.array(metadata, pa.list_(_OMNI_IMAGE))})
    return _write_parquet(table, path)


def _omni_image(base_url: str, img: Img, j: int) -> dict:
    sha = hashlib.sha256(_url(base_url, img.name).encode()).hexdigest()
    return {"aesthetic_prob": 0.5, "bytes": 2000 + j, "d_hash": sha[:16], "d_hash_dup_count": 1, "height": 48,
            "img_url_sha": sha, "p_hash": sha[16:32], "p_hash_dup_count": 1, "unsafe_prob": 0.01, "width": 48 + 8 * j}


def _write_parquet(table: pa.Table, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path

"""Readers added in catalog round two, on tiny files written here in each dataset's published layout."""
from __future__ import annotations

import csv
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalogs import SAMPLE_DIR, load_card
from catalogs.readers import read_rows
from pipeline.sources.formats import INVALID


def read(name: str, files: list[str], **spec) -> dict[str, list]:
    input_spec = types.SimpleNamespace(**{"url_col": "url", "caption_col": "caption",
                                          "save_additional_columns": [], "format": None, **spec})
    out: dict[str, list] = {}
    for chunk in read_rows(load_card(name), files, input_spec, batch_rows=2):
        n = len(next(iter(chunk.values())))
        before = len(next(iter(out.values()))) if out else 0
        for k in set(out) | set(chunk):
            out.setdefault(k, [None] * before).extend(chunk.get(k, [None] * n))
    return out


def test_wit_gzipped_tsv_with_the_data_md_columns():
    """Header row with the 17 DATA.md columns; caption falls back per row across the three descriptions."""
    rows = read("wit", [str(SAMPLE_DIR / "wit")], save_additional_columns=["page_title"])
    assert rows["url"][0] == "https://example.com/wit/Lighthouse.jpg"
    assert rows["caption"] == ["A lighthouse at dusk", "Français : Phare breton", "Leuchtturm im Nebel"]
    assert rows["doc_id"][1] == "https://fr.wikipedia.org/wiki/Phare" and rows["language"] == ["en", "fr", "de"]
    assert rows["page_title"] == ["Lighthouse", "Phare", "Leuchtturm"]


def _parquet(path: Path, columns: dict[str, list]) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_recap_datacomp_parquet_reads_the_recaption(tmp_path):
    """The hub card's features: url, re_caption, org_caption, sha256, key and the scores of both captions."""
    part = tmp_path / "data" / "train_data"
    part.mkdir(parents=True)
    _parquet(part / "train-00000-of-03550.parquet", {
        "url": ["https://example.com/r/1.jpg", "https://example.com/r/2.jpg"],
        "re_caption": ["A red bicycle leaning on a brick wall under a window.", None],
        "org_caption": ["bike for sale", "IMG_2211"], "sha256": ["ab" * 32, "cd" * 32], "key": ["000000001", "000000002"],
        "re_clip_score": [0.31, 0.28], "org_clip_score": [0.22, 0.12], "re_length": [11, 0], "org_length": [3, 1],
        "re_gpt4v_score": [4, 1], "org_gpt4v_score": [2, 1]})
    rows = read("recap-datacomp-1b", [str(tmp_path)], save_additional_columns=["org_caption"])
    assert rows["url"] == ["https://example.com/r/1.jpg", "https://example.com/r/2.jpg"]
    assert rows["caption"] == ["A red bicycle leaning on a brick wall under a window.", None]
    assert rows["sample_id"] == ["000000001", "000000002"] and rows["org_caption"] == ["bike for sale", "IMG_2211"]


def test_capsfusion_parquet_reads_the_fused_caption(tmp_path):
    """README fields: image_url, laion_2b (alt-text), laion_coco (BLIP caption), capsfusion."""
    path = _parquet(tmp_path / "capsfusion_1.parquet", {
        "image_url": ["https://example.com/c/1.jpg"], "laion_2b": ["Vintage Lamp 1950s"],
        "laion_coco": ["a lamp on a table"], "capsfusion": ["A vintage 1950s lamp stands on a wooden table."]})
    rows = read("capsfusion-120m", [path])
    assert rows == {"url": ["https://example.com/c/1.jpg"], "caption": ["A vintage 1950s lamp stands on a wooden table."]}


@pytest.mark.parametrize("licence_column", ["license", "license_type"])
def test_pd12m_reads_both_spellings_of_the_licence_column(tmp_path, licence_column):
    path = _parquet(tmp_path / "pd12m.000.parquet", {
        "id": ["a1", "a2"], "url": ["https://pd12m.s3.us-west-2.amazonaws.com/images/a1.jpeg", None],
        "caption": ["An engraving of a ship at sea.", "A botanical drawing of a fern."],
        "width": [1024, 768], "height": [768, 1024], "mime_type": ["image/jpeg", "image/jpeg"],
        "hash": ["0" * 32, "1" * 32], licence_column: ["https://creativecommons.org/publicdomain/zero/1.0/"] * 2})
    rows = read("pd12m", [path])
    assert rows["url"][1] is None  # a missing URL is passed on for the planner to report
    assert rows["sample_id"] == ["a1", "a2"] and rows["source_width"] == [1024, 768]
    assert rows["license"] == ["https://creativecommons.org/publicdomain/zero/1.0/"] * 2


def test_lvd2m_csv_python_literal_spans(tmp_path):
    """README columns; span is a Python-literal pair of HH:MM:SS.mmm strings, YouTube rows only."""
    path = tmp_path / "ytb_600k_720p.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["raw_caption", "refined_caption", "rewritten_caption", "key", "video_id", "url", "dataset_src",
                    "orig_caption", "total score", "span", "video_time"])
        w.writerow(["Caption 1: a dog runs. Caption 2: it stops.", "A dog runs across a lawn, then stops.",
                    "dog running on grass", "QMi8x8o55Ns_3", "QMi8x8o55Ns", "https://www.youtube.com/watch?v=QMi8x8o55Ns",
                    "panda70m", "a dog", "4.2", "['00:00:17.759', '00:00:23.279']", "5.52"])
        w.writerow(["c", "A webvid clip of waves.", "waves", "wv_1", "", "https://example.com/wv/1.mp4", "webvid",
                    "waves", "3.1", "", "12.0"])
        w.writerow(["c", "Broken span.", "x", "bad_1", "abc", "https://www.youtube.com/watch?v=abc", "internvid",
                    "x", "1.0", "['00:00:01.000', ", "1.0"])
    rows = read("lvd-2m", [str(tmp_path)])
    assert rows["clip_start"][0] == pytest.approx(17.759) and rows["clip_end"][0] == pytest.approx(23.279)
    assert rows["caption"][0] == "A dog runs across a lawn, then stops." and rows["clip_id"][0] == "QMi8x8o55Ns_3"
    assert rows["url"][1] == "https://example.com/wv/1.mp4" and rows["clip_start"][1] is None
    assert rows[INVALID][2] and "span" in rows[INVALID][2]  # an unparseable literal fails that row only
    assert rows[INVALID][0] is None and rows[INVALID][1] is None

"""Catalog readers on samples in each family's published layout, and hub loading from a local copy."""
from __future__ import annotations

import shutil
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalogs import SAMPLE_DIR, load_card
from catalogs.readers import read_rows
from pipeline.core.config import ConfigError


def sample(name: str) -> list[str]:
    files = sorted(str(p) for p in (SAMPLE_DIR / name).iterdir() if p.is_file())
    assert files, name
    return files


def read(name: str, files=None, documents=None, **spec) -> dict[str, list]:
    """All chunks of a card's sample, concatenated (``documents``: see read_rows)."""
    input_spec = types.SimpleNamespace(**{"url_col": "url", "caption_col": "caption",
                                          "save_additional_columns": [], "format": None, **spec})
    out: dict[str, list] = {}
    chunks = list(read_rows(load_card(name), files or sample(name), input_spec, batch_rows=2, documents=documents))
    for chunk in chunks:
        n = len(next(iter(chunk.values())))
        assert all(len(v) == n for v in chunk.values()), "columns of a chunk differ in length"
        before = len(next(iter(out.values()))) if out else 0
        for k in set(out) | set(chunk):
            out.setdefault(k, [None] * before).extend(chunk.get(k, [None] * n))
    return out


def test_cc3m_headerless_tsv_caption_then_url():
    rows = read("cc3m")
    assert rows["url"][0] == "http://example.com/img/bus-station.jpg"
    assert rows["caption"][0] == "a very typical bus station"
    assert rows["caption"][2] == b"caf\xe9 terrace at night"  # not UTF-8: kept as bytes for the planner
    assert set(rows) == {"url", "caption"}


def test_cc12m_headerless_tsv_url_then_caption():
    rows = read("cc12m")
    assert rows["url"] == ["https://example.com/a/lamp.jpg", "https://example.com/a/boat.jpg"]
    assert rows["caption"][0].startswith("A vintage brass <PERSON>")


def test_laion_parquet_scores_and_missing_url():
    rows = read("laion-400m")
    assert rows["url"][:2] == ["https://example.com/l4/1.jpg", "https://example.com/l4/2.jpg"]
    assert rows["url"][2] is None
    assert rows["clip_similarity"] == pytest.approx([0.331, 0.305, 0.312])
    assert rows["nsfw"] == ["UNLIKELY", "UNSURE", "UNLIKELY"]
    assert rows["license"][1] == "creativecommons.org/licenses/by/2.0"


def test_coyo_parquet_published_scores():
    rows = read("coyo-700m")
    assert rows["sample_id"] == [2559800550877, 4896263451343]
    assert rows["clip_similarity"] == pytest.approx([0.300293, 0.319336])
    assert rows["clip_l14_similarity"] == pytest.approx([0.258545, 0.248169])
    assert rows["watermark"] == pytest.approx([0.0191545, 0.0406009])
    assert rows["aesthetic"] == pytest.approx([7.1703, 7.04812])
    assert rows["source_width"] == [600, 600]


def test_datacomp_parquet_and_extra_columns():
    rows = read("datacomp-commonpool-medium", save_additional_columns=["face_bboxes"])
    assert rows["sample_id"][0] == "139e4a9b22a614771f06c700a8ebe150"
    assert rows["clip_l14_similarity"] == pytest.approx([0.29, 0.25], abs=1e-6)
    assert rows["face_bboxes"][1] == [pytest.approx([0.1, 0.2, 0.3, 0.4])]
    assert len(rows["source_sha256"][0]) == 64


def test_webvid_csv_iso_durations():
    rows = read("webvid-10m", save_additional_columns=["page_dir"])
    assert rows["duration"] == [11.0, 29.0, 62.5]
    assert rows["caption"][1] == "Sunset, time lapse over the city"  # quoted CSV field with a comma
    assert rows["url"][0] == "https://example.com/webvid/21179416.mp4"
    assert rows["page_dir"][0] == "006001_006050"


def test_panda70m_parallel_lists_one_row_per_clip():
    rows = read("panda-70m")
    assert rows["url"][:3] == ["https://www.youtube.com/watch?v=aIPu1xGNbhc"] * 2 + \
        ["https://www.youtube.com/watch?v=AIyw1FO1aqs"]
    assert rows["caption"][1] == "The lion's cub watches from the grass."
    assert rows["clip_start"][:3] == pytest.approx([0.0, 5.005, 70.5])
    assert rows["clip_end"][:3] == pytest.approx([5.005, 12.346, 80.0])
    assert rows["match_score"][:3] == pytest.approx([0.4711, 0.4402, 0.5012])
    # the last row's lists differ in length: one invalid input row, nothing guessed
    assert rows["_invalid"][:3] == [None] * 3
    assert "differ in length" in rows["_invalid"][3]
    assert rows["url"][3] is None and len(rows["url"]) == 4


def test_hdvila_jsonl_clip_spans():
    rows = read("hd-vila-100m")
    assert rows["clip_id"] == ["QMi8x8o55Ns.1.mp4", "QMi8x8o55Ns.16.mp4", "xyzABC12345.0.mp4"]
    assert rows["clip_start"] == pytest.approx([17.759, 292.14, 0.0])
    assert rows["clip_end"] == pytest.approx([23.279, 303.35, 7.5])
    assert rows["video_id"] == ["QMi8x8o55Ns", "QMi8x8o55Ns", "xyzABC12345"]
    assert "_invalid" not in rows


def test_internvid_timestamps_and_youtube_ids():
    rows = read("internvid")
    assert rows["url"] == ["https://www.youtube.com/watch?v=zPQdm3lBgkk", "https://www.youtube.com/watch?v=1vAeBh1mP0s"]
    assert rows["clip_start"] == pytest.approx([453.689, 2.002])
    assert rows["clip_end"] == pytest.approx([471.085, 9.843])
    assert rows["match_score"] == pytest.approx([0.4523, 0.4410])


def test_obelics_one_row_per_image_with_document_and_position():
    rows = read("obelics", documents=False)  # the pair layout; documents: test_document_readers.py
    assert rows["url"] == ["https://example.com/ob/cat.jpg", "https://example.com/ob/dog.jpg"]
    assert rows["position"] == [0, 2]
    assert rows["doc_id"] == ["https://example.com/pets"] * 2
    assert rows["caption"] == ["a grey cat", None]


def test_mmc4_zipped_documents_one_row_per_image():
    rows = read("mmc4", documents=False)
    assert rows["url"] == ["http://example.com/honda/index.90.jpg", "http://example.com/honda/index.91.jpg"]
    assert rows["caption"] == ["The tailgate locks at the same time.", "Press the master switch to lock all doors."]
    assert rows["position"] == [2, 1]
    assert rows["doc_id"] == ["http://example.com/hofi-48.html"] * 2
    assert rows["clip_l14_similarity"] == pytest.approx([0.2769, 0.3235])


def test_job_url_and_caption_columns_override_the_card():
    rows = read("coyo-700m", caption_col="image_phash")
    assert rows["caption"] == ["e9e90c24f1d9c674", "bac58374982e0fc7"]


def test_a_file_of_another_layout_fails_with_its_columns():
    with pytest.raises(ConfigError, match="has no column 'contentUrl'.*columns: "):
        read("webvid-10m", files=sample("panda-70m"))


def test_a_card_without_reader_says_so():
    with pytest.raises(ConfigError, match="not confirmed"):
        read("mint-1t", files=sample("obelics"))


def test_local_folder_copy_uses_the_card_patterns(tmp_path):
    (tmp_path / "sub").mkdir()
    shutil.copy(sample("webvid-10m")[0], tmp_path / "sub" / "part-1.csv")
    (tmp_path / "notes.txt").write_text("not data")
    rows = read("webvid-10m", files=[str(tmp_path)])
    assert len(rows["url"]) == 3


def test_bundled_panda_zip_is_read_in_place(tmp_path):
    import zipfile

    path = tmp_path / "panda70m_training_2m.csv.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.write(sample("panda-70m")[0], "panda70m_training_2m.csv")
    rows = read("panda-70m", files=[str(path)])
    assert len(rows["url"]) == 4


# -- Hugging Face hub datasets, from a local cache built here (no network) --------------------------

def _hub_cache(root: Path, repo: str, files: dict[str, Path]) -> None:
    """The on-disk layout huggingface_hub uses for a cached dataset snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"datasets--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        dst = base / "snapshots" / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_dataset_from_the_local_cache(offline_hub):
    part = Path(sample("datacomp-commonpool-medium")[0])
    # one repo per scale, parquet parts at its root (DataComp's download_upstream.py)
    _hub_cache(offline_hub, "mlfoundations/datacomp_medium",
               {"0000.parquet": part, "0001.parquet": part, "0000.npz": part})
    for entry in ("hf://datasets/mlfoundations/datacomp_medium", "mlfoundations/datacomp_medium"):
        rows = read("datacomp-commonpool-medium", files=[entry])
        assert len(rows["url"]) == 4  # the parquet parts only, per the card's file pattern
    rows = read("datacomp-commonpool-medium", files=["hf://datasets/mlfoundations/datacomp_medium/0001.parquet"])
    assert len(rows["url"]) == 2


def test_hub_dataset_missing_from_the_cache_explains_how_to_fetch(offline_hub):
    with pytest.raises(ConfigError, match="huggingface-cli download"):
        read("obelics", files=["hf://datasets/HuggingFaceM4/OBELICS"])


def test_hub_dataset_loads_with_datasets_from_the_same_cache(offline_hub, tmp_path):
    """The same cached snapshot is readable by `datasets` (what users of the hub repo would do)."""
    import datasets
    from huggingface_hub import snapshot_download

    part = Path(sample("obelics")[0])
    _hub_cache(offline_hub, "HuggingFaceM4/OBELICS", {"data/train-00000-of-00001.parquet": part})
    rows = read("obelics", files=["HuggingFaceM4/OBELICS"], documents=False)
    assert rows["position"] == [0, 2]
    root = snapshot_download("HuggingFaceM4/OBELICS", repo_type="dataset", local_files_only=True)
    ds = datasets.load_dataset("parquet", data_files=f"{root}/data/*.parquet", split="train",
                               cache_dir=str(tmp_path / "ds"))
    assert ds.num_rows == 2 and ds.column_names == ["images", "metadata", "general_metadata", "texts"]


# -- through the shard planner (pipeline.job.build.input_shards), as a job runs it ------------------

def test_planner_reads_a_catalog_input():
    from pipeline.job.build import input_shards
    from pipeline.job.spec import load_job

    spec = load_job(data={"input": {"catalog": "panda-70m", "files": sample("panda-70m")},
                          "output": {"dir": "out/x", "samples_per_shard": 3}})
    shards = list(input_shards(spec))
    assert [len(s.batch["key"]) for s in shards] == [3, 1]
    first = shards[0].batch
    assert first["clip_start"] == pytest.approx([0.0, 5.005, 70.5])
    assert first["status"] == ["pending"] * 3
    last = shards[1].batch
    assert last["status"] == ["invalid_input"]


def test_parquet_reads_only_the_needed_columns(tmp_path):
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"url": ["https://e.com/a.jpg"], "text": ["a"], "uid": ["u"],
                             "big_unused": [list(range(1000))]}), path)
    rows = read("datacomp-commonpool-medium", files=[str(path)])
    assert "big_unused" not in rows and rows["sample_id"] == ["u"]

"""`mmcurate catalog ...`, the HTML page and the bundled job specs."""
from __future__ import annotations

from html.parser import HTMLParser

import pytest
from pathlib import Path

import yaml

from catalogs import all_cards, load_card
from helpers.catalog_cli import run, run_json
from helpers.paths import REPO
from pipeline.cli.main import main
from pipeline.job.spec import load_job

# Every bundled job (one per card with a reader: the recommended job of `catalog show`).
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.yaml") if p.stem != "demo")


def test_list_text_and_json(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0 and "NAME" in out.splitlines()[0]
    assert all(c.name in out for c in all_cards())
    rows = run_json(capsys, "list")
    assert [r["name"] for r in rows] == sorted(c.name for c in all_cards())


def test_list_filters(capsys):
    video = run_json(capsys, "list", "--modality", "video")
    assert video and {r["modality"] for r in video} == {"video-text"}
    withdrawn = {r["name"] for r in run_json(capsys, "list", "--status", "withdrawn")}
    assert {"laion-400m", "laion-5b", "webvid-10m"} <= withdrawn
    assert "coyo-700m" not in withdrawn
    commercial = run_json(capsys, "list", "--commercial")
    assert commercial and all(r["commercial_use"] is True for r in commercial)
    assert "panda-70m" not in {r["name"] for r in commercial}
    big = run_json(capsys, "list", "--min-samples", "1B")
    assert big and all(r["samples"] >= 1e9 for r in big)
    assert "datacomp-commonpool-xlarge" in {r["name"] for r in big}
    assert {r["name"] for r in run_json(capsys, "list", "--has-reader")} == {c.name for c in all_cards() if c.reader}


def test_list_sorting(capsys):
    rows = run_json(capsys, "list", "--sort", "samples", "--reverse")
    known = [r["samples"] for r in rows if r["samples"] is not None]
    assert known == sorted(known, reverse=True)
    assert all(r["samples"] is None for r in rows[len(known):])  # unknown sizes last
    years = [r["year"] for r in run_json(capsys, "list", "--sort", "year") if r["year"] is not None]
    assert years == sorted(years)


def test_bad_min_samples_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["catalog", "list", "--min-samples", "lots"])
    assert "12.5M" in capsys.readouterr().err


def test_show_text_has_facts_sources_and_run_line(capsys):
    code, out, _ = run(capsys, "show", "Panda70M")
    assert code == 0
    assert "70,723,513" in out and "2402.19479" in out
    assert "https://github.com/snap-research/Panda-70M/blob/main/LICENSE" in out
    assert "mmcurate run jobs/panda-70m.yaml" in out
    code, out, _ = run(capsys, "show", "laion-5b")
    assert "WITHDRAWN" in out and "relaion-5b-research-safe" in out
    code, out, _ = run(capsys, "show", "msr-vtt")
    assert "(unconfirmed)" in out and "no catalog reader" in out


def test_show_json(capsys):
    data = run_json(capsys, "show", "cc3m")
    assert data["name"] == "cc3m" and data["metadata"]["names"] == ["caption", "url"]
    assert data["facts"]["license.commercial_use"]["confirmed"] is True
    assert data["facts"]["size.samples"]["sources"]
    assert data["run"] == "mmcurate run jobs/cc3m.yaml" and data["job_file"] == "jobs/cc3m.yaml"
    load_job(data=data["job_spec"])
    data = run_json(capsys, "show", "relaion-5b-research-safe")
    assert data["facts"]["size.samples"] == {"value": None, "confirmed": False, "sources": []}


def test_show_unknown_name_fails_with_suggestions(capsys):
    code, _, err = run(capsys, "show", "webvid-1m")
    assert code == 2 and "webvid-10m" in err


def test_search(capsys):
    names = [r["name"] for r in run_json(capsys, "search", "youtube")]
    assert {"panda-70m", "internvid", "hd-vila-100m"} <= set(names)
    assert run_json(capsys, "search", "laion", "coco")[0]["name"] == "laion-coco"
    assert run_json(capsys, "search", "coyo")[0]["name"] == "coyo-700m"  # name hits rank first
    assert run_json(capsys, "search", "UMT_Score")[0]["name"] == "internvid"  # source column names
    code, out, err = run(capsys, "search", "no-such-dataset-anywhere")
    assert code == 0 and out == "" and "no dataset matches" in err


def test_spec_prints_a_valid_job(capsys, tmp_path):
    code, out, _ = run(capsys, "spec", "webvid-10m", "--files", "data/x.csv", "--out", "out/w")
    assert code == 0
    spec = load_job(data=yaml.safe_load(out))
    assert spec.input.catalog == "webvid-10m" and spec.input.files == ["data/x.csv"]
    assert spec.download.media == "video" and spec.output.dir == "out/w" and spec.execution.engine == "ray"
    spec = load_job(data=run_json(capsys, "spec", "coyo-700m"))
    assert spec.input.files == ["hf://datasets/kakaobrain/coyo-700m"] and spec.download.image_size == 256
    code, _, err = run(capsys, "spec", "flickr30k")
    assert code == 2 and "no confirmed column map" in err


def test_spec_of_a_youtube_card_caps_yt_dlp_like_the_shipped_job(capsys):
    spec = load_job(data=run_json(capsys, "spec", "panda-70m"))
    shipped = load_job(Path(__file__).parents[2] / "jobs" / "panda-70m.yaml")
    assert spec.video.backend == "auto"
    assert (spec.video.ytdlp_concurrency, spec.video.ytdlp_rate) == (shipped.video.ytdlp_concurrency,
                                                                     shipped.video.ytdlp_rate)


class _Table(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: list[str] = []
        self.external: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "id" in a:
            self.rows.append(a["id"])
        if tag in ("script", "link", "img") and (a.get("src") or (tag == "link" and a.get("href"))):
            self.external.append(a.get("src") or a.get("href"))
        self.scripts += tag == "script"


def test_html_page_is_self_contained_and_lists_every_card(capsys, tmp_path):
    out = tmp_path / "site" / "catalog.html"
    data = run_json(capsys, "html", str(out))
    assert data == {"path": str(out), "cards": len(all_cards())}
    page = out.read_text()
    parser = _Table()
    parser.feed(page)
    parser.close()
    assert sorted(parser.rows) == sorted(c.name for c in all_cards())
    assert parser.external == [] and parser.scripts == 1
    assert "addEventListener('click'" in page and "minsamples" in page  # sorting and filtering
    assert 'data-status="withdrawn"' in page and 'data-commercial="yes"' in page


def test_help_texts_explain(capsys):
    with pytest.raises(SystemExit):
        main(["catalog", "list", "--help"])
    text = capsys.readouterr().out
    assert "--min-samples" in text and "10M" in text and "--commercial" in text


@pytest.mark.parametrize("name", JOBS)
def test_bundled_job_specs_load_and_fit_their_card(name):
    path = REPO / "jobs" / f"{name}.yaml"
    spec = load_job(path)
    card = load_card(spec.input.catalog)
    assert card.name == name and card.reader is not None
    assert spec.execution.engine == "ray"
    assert spec.output.dir.startswith("out/")
    if card.modality == "video-text":
        assert spec.download.media == "video"
        if card.metadata.media == "youtube":
            assert spec.download.per_host_limit <= 4
    else:  # an interleaved card with a document reader produces documents
        media = "document" if card.reader.layout == "document" else "image"
        assert (spec.download.media, spec.download.image_size, spec.download.resize_mode) == \
            (media, 256, "center_crop")
    if card.metadata.hf_repo and spec.input.files[0].startswith("hf://"):
        assert card.metadata.hf_repo in spec.input.files[0]


def test_every_job_file_names_a_card():
    for path in (REPO / "jobs").glob("*.yaml"):
        spec = load_job(path)
        if path.stem != "demo":
            assert spec.input.catalog == path.stem

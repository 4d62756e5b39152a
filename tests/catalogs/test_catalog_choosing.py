"""What a person choosing a dataset needs: units, verification dates, a commercial answer that honours
withdrawals and research-only requests, reader and media columns, a recommended job; and output
that survives being piped into `head`."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catalogs import CARD_DIR, all_cards, load_card
from catalogs.card import Card
from catalogs.present import details, render_show
from helpers.catalog_cli import run, run_json
from helpers.paths import REPO
from pipeline.core.config import ConfigError, from_dict
from pipeline.job.spec import load_job

MMCURATE = Path(sys.executable).parent / "mmcurate"


def _banner(card: Card) -> str:
    """The lines between the title rule and the first blank line."""
    lines = render_show(card).splitlines()[2:]
    return "\n".join(lines[:lines.index("")])


@pytest.mark.parametrize("card", [c for c in all_cards() if c.status.state == "withdrawn"], ids=lambda c: c.name)
def test_withdrawn_banner_says_each_thing_once(card: Card):
    banner = _banner(card)
    assert banner.startswith("WITHDRAWN")
    sentences = [s.strip() for s in re.split(r"(?<=[.;])\s+", " ".join(banner.split())) if s.strip()]
    assert len(sentences) == len(set(sentences)), banner
    assert banner.count("instead") <= 1 and len(re.findall(r"\bUse\b", banner)) <= 1, banner
    if card.status.successor:
        assert banner.count(card.status.successor) == 1, banner


@pytest.mark.parametrize("argv", [["catalog", "show", "laion-5b"], ["catalog", "list"],
                                  ["catalog", "list", "--json"], ["catalog", "search", "laion"]])
def test_output_into_a_closed_pipe_ends_quietly(argv):
    """`mmcurate catalog show ... | head`: the reader is gone before we write (the read end is closed first)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([str(MMCURATE), *argv], stdout=write_end, stderr=subprocess.PIPE, timeout=60,
                              cwd=REPO)
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 0


def test_commercial_answer_honours_withdrawal_and_research_only(capsys):
    rows = {r["name"]: r for r in run_json(capsys, "list")}
    for name, why in [("laion-coco", "withdrawn"), ("relaion-5b-research", "research"), ("coyo-700m", "research"),
                      ("webvid-10m", "withdrawn"), ("panda-70m", "licence")]:
        assert rows[name]["commercial"] == "no", name
        assert why in rows[name]["commercial_reason"], (name, rows[name]["commercial_reason"])
    assert rows["laion-coco"]["commercial_use"] is True  # the licence's own answer is still reported
    commercial = {r["name"] for r in run_json(capsys, "list", "--commercial")}
    assert commercial and not commercial & {"laion-coco", "relaion-5b-research", "coyo-700m", "webvid-10m"}
    assert "cc3m" in commercial
    assert all(rows[n]["commercial"] == "yes" for n in commercial)
    code, out, _ = run(capsys, "show", "coyo-700m")
    assert "commercial use no (the publisher asks for research use only)" in " ".join(out.split())


def test_list_shows_units_reader_media_and_verified(capsys):
    code, out, _ = run(capsys, "list")
    header = out.splitlines()[0].split()
    assert {"SIZE", "READER", "MEDIA", "VERIFIED"} <= set(header)
    rows = run_json(capsys, "list")
    by_name = {r["name"]: r for r in rows}
    line = next(ln for ln in out.splitlines() if ln.startswith("cc3m "))
    assert "3.32M image-text pairs" in line and " yes " in line and " urls " in line
    assert by_name["cc3m"]["verified"] in line
    for r in rows:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["verified"]), r["name"]
        assert r["media"] in ("urls", "youtube", "hosted")
        if r["samples"]:
            assert r["size"].endswith(r["unit"]) and r["unit"].strip()
    assert by_name["panda-70m"]["media"] == "youtube" and by_name["openvid-1m"]["media"] == "hosted"


def _base() -> dict:
    return yaml.safe_load((CARD_DIR / "coyo-700m.yaml").read_text())


def test_schema_needs_a_verified_date_and_sources_for_download_facts():
    data = _base()
    del data["verified"]
    with pytest.raises(ConfigError, match="verified: missing"):
        from_dict(Card, data)
    data["verified"] = "last week"
    with pytest.raises(ConfigError, match="verified: expected YYYY-MM-DD, got 'last week'"):
        from_dict(Card, data)
    data = _base()
    data["download"] = {"disk_256px_gb": 331.5}
    with pytest.raises(ConfigError, match="download.disk_256px_gb: set to 331.5 but no entry in sources"):
        from_dict(Card, data)
    data["download"] = {"success_rate": 1.5}
    with pytest.raises(ConfigError, match=r"success_rate: expected a share in \(0, 1\], got 1.5"):
        from_dict(Card, data)
    data = copy.deepcopy(_base())
    data["license"]["research_only"] = True
    data["sources"] = [{"url": "https://example.com", "facts": [f for f in s["facts"] if f != "license"]}
                       for s in data["sources"]] + [{"url": "https://example.org", "facts": ["license.name",
                                                                                              "license.commercial_use"]}]
    with pytest.raises(ConfigError, match="license.research_only: set to True but no entry"):
        from_dict(Card, data)


@pytest.mark.parametrize("card", all_cards(), ids=lambda c: c.name)
def test_every_card_has_a_recommended_job_or_says_why_not(card: Card):
    data = details(card)
    job, why = data["recommended_job"], data["recommended_job_reason"]
    assert why
    if card.reader is not None and card.status.state != "withdrawn":
        assert job == f"jobs/{card.name}.yaml", "a card with a reader needs a bundled job"
    if card.status.state == "withdrawn" and card.status.successor:
        assert "successor" in why and card.status.successor in why
        assert job == f"jobs/{card.status.successor}.yaml"
    if job:
        spec = load_job(REPO / job)
        assert load_card(spec.input.catalog).reader is not None
    if card.reader is None:
        assert job is None or card.status.state == "withdrawn"
        assert "no reader" in why or card.status.state == "withdrawn"


def test_html_page_has_media_verified_and_the_commercial_answer(tmp_path):
    from catalogs.html import render

    page = render(all_cards(), generated="2026-12-02")
    assert "<th data-type=\"text\">Media</th>" in page and "<th data-type=\"text\">Verified</th>" in page
    row = page[page.index('<tr id="coyo-700m"'):]
    row = row[:row.index("</tr>")]
    assert 'data-commercial="no"' in row and "research use only" in row and "2026-12-02" in row

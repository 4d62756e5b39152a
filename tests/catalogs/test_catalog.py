"""The card schema, the bundled cards and the lookup."""
from __future__ import annotations

import copy

import pytest
import yaml

from catalogs import CARD_DIR, SAMPLE_DIR, CatalogError, all_cards, load_card, parse_card
from catalogs.card import COLUMNS, REQUIRED_FACTS, Card, fact_value
from catalogs.rowpath import compile_path
from catalogs.timeparse import to_seconds
from pipeline.core.config import ConfigError, from_dict

# The datasets the catalog must cover (the list), by card name.
REQUIRED = ["laion-400m", "laion-5b", "relaion-5b-research", "relaion-5b-research-safe", "laion-coco",
            "laion-aesthetics", "coyo-700m", "datacomp-commonpool-small", "datacomp-commonpool-medium",
            "datacomp-commonpool-large", "datacomp-commonpool-xlarge", "datacomp-1b", "cc3m", "cc12m",
            "sbu-captions", "coco-captions", "flickr30k", "redcaps", "wit", "yfcc100m", "webvid-10m", "webvid-2m",
            "hd-vila-100m", "panda-70m", "internvid", "howto100m", "yt-temporal-180m", "openvid-1m", "msr-vtt",
            "vidgen-1m", "mmc4", "obelics", "omnicorpus", "mint-1t"]


def test_every_required_dataset_has_a_valid_card():
    names = {c.name for c in all_cards()}
    assert set(REQUIRED) <= names
    assert len(names) >= 25


@pytest.mark.parametrize("card", all_cards(), ids=lambda c: c.name)
def test_card_facts_are_sourced_or_marked_unconfirmed(card: Card):
    for fact in REQUIRED_FACTS:
        value = fact_value(card, fact)
        if fact in card.unconfirmed:
            assert value in (None, [], {}, ""), f"{fact} is unconfirmed but set"
        else:
            assert value not in (None, [], {}, ""), f"{fact} is empty but not listed as unconfirmed"
            assert card.sources_for(fact), f"{fact} has no source"
    for src in card.sources:
        assert src.url.startswith(("http://", "https://"))
    if card.status.state == "withdrawn":
        assert card.status.date and card.status.note


def test_withdrawals_and_successors():
    assert load_card("laion-5b").status.state == "withdrawn"
    assert load_card("laion-5b").status.date == "2023-12"
    assert load_card("webvid-10m").status.date == "2024-02"
    successor = load_card("laion-400m").status.successor
    assert load_card(successor).status.state == "gated"


@pytest.mark.parametrize("query,name", [("LAION-400M", "laion-400m"), ("laion_400m", "laion-400m"),
                                        ("Panda70M", "panda-70m"), ("coyo", "coyo-700m"), ("CC3M", "cc3m"),
                                        ("conceptual captions", "cc3m"), ("obelisc", "obelics")])
def test_lookup_ignores_case_dashes_and_accepts_aliases(query, name):
    assert load_card(query).name == name


def test_unknown_name_lists_close_names():
    with pytest.raises(CatalogError, match="laion-5b"):
        load_card("laoin-5b")
    with pytest.raises(CatalogError) as e:
        load_card("panda-7")
    assert "panda-70m" in str(e.value)
    with pytest.raises(CatalogError, match="no catalog card named"):
        load_card("zzzz-nothing")


def test_every_sample_belongs_to_a_card_with_a_reader():
    dirs = sorted(p.name for p in SAMPLE_DIR.iterdir() if p.is_dir())
    assert dirs
    for d in dirs:
        assert load_card(d).reader is not None, d
    explode = {c.name for c in all_cards() if c.reader and c.reader.layout == "explode"}
    assert explode <= set(dirs), "every explode layout needs a sample"


# -- the schema rejects bad cards with messages that name the key -----------------------------------

def _base() -> dict:
    return yaml.safe_load((CARD_DIR / "coyo-700m.yaml").read_text())


def _check(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(Card, data)


def test_schema_accepts_the_base_card():
    assert from_dict(Card, _base()).name == "coyo-700m"


def test_schema_rejects_unsourced_and_guessed_facts():
    data = _base()
    data["sources"] = [{"url": "https://example.com", "facts": ["size.samples"]}]
    _check(data, "no entry in sources supports")
    data = _base()
    data["unconfirmed"] = ["year"]
    _check(data, "listed as unconfirmed but has a value")
    data = _base()
    data["year"] = None
    _check(data, "year: missing")


def test_schema_rejects_bad_values():
    for path, value, message in [
        (("paper", "arxiv"), "arXiv:2111", "arxiv"),
        (("status", "date"), "Dec 2023", "YYYY-MM"),
        (("metadata", "hf_repo"), "no-slash", "ORG/NAME"),
        (("reader", "columns"), {"url": "url", "clip_score": "x"}, "unknown normalised name"),
        (("reader", "columns"), {"caption": "text"}, "must map 'url'"),
        (("reader", "columns"), {"url": "a[b"}, "brackets"),
        (("reader", "layout"), "explode", "needs the list columns"),
        (("modality",), "audio-text", "expected 'image-text'"),
    ]:
        data = copy.deepcopy(_base())
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        _check(data, message)


def test_schema_names_unknown_keys():
    data = _base()
    data["licence"] = data.pop("license")
    _check(data, "did you mean 'license'")


def test_withdrawn_needs_a_note(tmp_path):
    data = _base()
    data["status"] = {"state": "withdrawn", "date": "2024-01"}
    _check(data, "withdrawn dataset needs a note")


def test_file_name_must_match(tmp_path):
    p = tmp_path / "other-name.yaml"
    p.write_text((CARD_DIR / "coyo-700m.yaml").read_text())
    with pytest.raises(CatalogError, match="must match the file name"):
        parse_card(p)


def test_duplicate_alias_across_cards_is_an_error(tmp_path):
    for name in ("a-one", "b-two"):
        data = _base()
        data["name"] = name
        data["aliases"] = ["shared"]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(CatalogError, match="also used by"):
        all_cards(tmp_path)


def test_normalised_columns_do_not_collide_with_the_status_table():
    from pipeline.core import schema

    assert not set(COLUMNS) & (set(schema.STATUS_COLUMNS) - {"url", "caption"})


# -- value parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,seconds", [
    ("PT00H00M11S", 11.0), ("PT1M30.5S", 90.5), ("P1DT1S", 86401.0), ("pt2h", 7200.0),
    ("00:07:33.689", 453.689), ("0:00:05.005", 5.005), ("1:02", 62.0), ("12.5", 12.5), (3, 3.0),
    ("01:02:03,5", 3723.5)])
def test_to_seconds(value, seconds):
    assert to_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["PT", "abc", "1:99:00", "nan", float("inf"), b"12"])
def test_to_seconds_leaves_unparseable_values_alone(value):
    assert to_seconds(value) is value


def test_to_seconds_missing():
    assert to_seconds(None) is None and to_seconds("  ") is None


def test_row_paths():
    row = {"text_list": ["a", "b", "c"], "image_info": {"matched_text_index": 1, "raw_url": "u"}, "@index": 3,
           "URL": "x", "doc": {"meta": None}}
    assert compile_path("text_list[image_info.matched_text_index]").resolve(row) == "b"
    assert compile_path("image_info.raw_url").resolve(row) == "u"
    assert compile_path("@index").resolve(row) == 3
    assert compile_path("url|URL").resolve(row) == "x"
    assert compile_path("doc.meta.deeper").resolve(row) is None
    assert compile_path("text_list[@index]").resolve(row) is None  # out of range
    assert compile_path("text_list[image_info.matched_text_index]").columns() == {"text_list", "image_info"}
    with pytest.raises(ValueError):
        compile_path("a]b")

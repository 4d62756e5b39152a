"""Catalog round two (issue 18): facts its sources give that the cards had left out, and the
download facts as a person choosing sees them in `catalog show`."""
from __future__ import annotations

import yaml

from catalogs import CARD_DIR, load_card
from catalogs.card import Card
from catalogs.present import render_show
from pipeline.core.config import from_dict

IMG2DATASET = "https://github.com/rom1504/img2dataset/blob/main/dataset_examples/"


def test_coco_says_how_many_pairs_the_2017_train_parquet_holds():
    """img2dataset's mscoco.md: the train split is "a dataset of 600 thousands image and caption"."""
    card = load_card("coco-captions")
    access = " ".join(card.metadata.access.split())
    assert "2017 train split" in access and "600 thousand" in access
    assert IMG2DATASET + "mscoco.md" in [s.url for s in card.sources_for("metadata.location")]


def test_laion5b_gives_the_256px_disk_size_its_img2dataset_page_states():
    """img2dataset's laion5B.md: "You can choose to resize to 256 instead to get a 50TB dataset"."""
    card = load_card("laion-5b")
    assert card.download.disk_256px_gb == 50_000
    assert IMG2DATASET + "laion5B.md" in [s.url for s in card.sources_for("download.disk_256px_gb")]
    assert "download       50K GB at 256 px  [3]" in render_show(card)


def test_a_success_rate_is_shown_as_a_share_of_urls_with_its_source():
    data = yaml.safe_load((CARD_DIR / "coyo-700m.yaml").read_text())
    data["download"] = {"success_rate": 0.87, "note": "measured on a test run"}
    data["sources"].append({"url": "https://example.com/run", "facts": ["download"]})
    page = render_show(from_dict(Card, data))
    assert f"download       87% of URLs downloaded  [{len(data['sources'])}]" in page
    assert "measured on a test run" in page

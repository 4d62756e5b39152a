"""Quality filters (issue 14): every filter that reads CLIP embeddings shares the one image
pass of its CLIP, semantic dedup included, and `mmcurate report` draws each new filter's score with
the threshold its options or its manifest state give."""
from __future__ import annotations

from filters import build_filters
from pipeline.cli.report_scores import plan
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS

CLIP = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS)}


def test_aesthetic_nsfw_and_semantic_dedup_of_one_clip_share_the_jobs_clip_score():
    stages = build_filters([{"clip_score": {**CLIP, "min": 0.1}},
                            {"aesthetic": {"checkpoint": "a.pth", **CLIP}},
                            {"semantic_dedup": CLIP},
                            {"nsfw": {"checkpoint": "n.pth", **CLIP}}])
    assert [s.name for s in stages] == ["clip_score", "aesthetic", "semantic_dedup", "nsfw"]
    assert stages[0].share_embeddings and stages[0].config.captions
    # without a clip_score of their own CLIP, one image-only stage is added, once, before the first
    stages = build_filters([{"semantic_dedup": CLIP}, {"aesthetic": {"checkpoint": "a.pth", **CLIP}}])
    assert [s.name for s in stages] == ["clip_score", "semantic_dedup", "aesthetic"]
    assert not stages[0].config.captions and stages[0].share_embeddings


def test_the_report_draws_each_new_score_with_its_threshold():
    filters = [{"aesthetic": {"checkpoint": "a.pth", "min": 5}},
               {"nsfw": {"checkpoint": "n.pth", "top_fraction": 0.9}},
               {"watermark": {"preset": "laion", "checkpoint": "w.pt", "max": 0.5}},
               {"language": {"languages": ["en"], "min_score": 0.6}},
               {"semantic_dedup": {"threshold": 0.9}}]
    result = plan({"job": {"filters": filters}, "stage_state": {"nsfw": {"threshold": 0.2, "top_fraction": 0.9}}})
    assert {c: (s.computed, s.marks) for c, s in result.scores.items()} == {
        "aesthetic_score": (True, [(5.0, "min 5")]),
        "nsfw_score": (True, [(0.2, "top 90% → 0.200")]),
        "aesthetic_scores": (True, [(5.0, "min 5")]),
        "nsfw_scores": (True, [(0.2, "top 90% → 0.200")]),
        "watermark_score": (True, [(0.5, "max 0.5")]),
        "language_score": (True, [(0.6, "min_score 0.6")]),
        "semantic_similarity": (True, [(0.9, "threshold 0.9")]),
    }
    assert result.notes == []

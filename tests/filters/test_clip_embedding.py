"""The shared CLIP embedding pass: the transient embedding column, build_filters fusing one
clip_score stage per CLIP before the filters that read its embeddings."""
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from filters import build_filters
from filters.clip_score import IMAGE_EMBEDDING
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
from pipeline.testing.output import write_shards

CLIP = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS)}


def test_the_embedding_column_is_never_written(tmp_path):
    batch = synthetic.make_batch(synthetic.make_pairs(3, seed=5))
    batch[IMAGE_EMBEDDING] = [np.ones(4, np.float32), None, np.zeros(4, np.float32)]
    batch["clip_score"] = [0.1, None, 0.3]
    write_shards(tmp_path, [batch], column_types={"clip_score": "double"})
    table = pq.read_table(tmp_path / "00000.parquet")
    assert "clip_score" in table.column_names and IMAGE_EMBEDDING not in table.column_names
    with tarfile.open(tmp_path / "00000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
        assert all(not m.name.endswith(".npy") for m in tar.getmembers())
    assert len(metas) == 3 and all("clip_score" in m and IMAGE_EMBEDDING not in m for m in metas)
    assert IMAGE_EMBEDDING in schema.TRANSIENT_COLUMNS  # the rule's one place


def heads_entries(tmp_path, **options):
    from pipeline.testing.clip_heads import aesthetic_state, nsfw_state, save_head

    a = save_head(tmp_path / "aesthetic.pth", aesthetic_state(64, seed=1))
    n = save_head(tmp_path / "nsfw.pth", nsfw_state(64, seed=2))
    return [{"aesthetic": {"checkpoint": str(a), **CLIP, **options.get("aesthetic", {})}},
            {"nsfw": {"checkpoint": str(n), **CLIP, **options.get("nsfw", {})}}]


def test_one_clip_stage_per_clip_before_its_readers(tmp_path):
    aesthetic, nsfw = heads_entries(tmp_path)
    clip = {"clip_score": {**CLIP, "min": 0.1}}
    stages = build_filters([{"caption": {"min_words": 2}}, clip, aesthetic, nsfw], check=True)
    assert [s.name for s in stages] == ["caption", "clip_score", "aesthetic", "nsfw"]  # the job's own, shared
    assert stages[1].share_embeddings and stages[1].config.captions
    assert not build_filters([clip])[0].share_embeddings  # nobody reads them: the column is not made
    stages = build_filters([{"caption": {"min_words": 2}}, aesthetic, {"image_size": {}}, nsfw])
    assert [s.name for s in stages] == ["caption", "clip_score", "aesthetic", "image_size", "nsfw"]
    assert not stages[1].config.captions and stages[1].share_embeddings
    # a clip_score of the same CLIP after a reader would be a second image pass
    with pytest.raises(ConfigError, match=r"filters\[1\]\.clip_score: aesthetic before it reads .* "
                                          "put clip_score first"):
        build_filters([aesthetic, clip])
    # another CLIP's embeddings between a reader and its CLIP's stage
    with pytest.raises(ConfigError, match=r"filters\[3\]\.nsfw: reads the image embeddings of .*tiny-clip\.json.* "
                                          r"a clip_score of ViT-B-32 \(random\) replaces them"):
        build_filters([clip, aesthetic, {"aesthetic": {**aesthetic["aesthetic"], "model": "ViT-B-32",
                                                       "pretrained": "random"}}, nsfw])
    # a check error of an added CLIP stage names the filter that needs it
    with pytest.raises(ConfigError, match=r"filters\[0\]\.aesthetic: its CLIP: clip_score\.pretrained: 'nope'"):
        build_filters([{"aesthetic": {**aesthetic["aesthetic"], "model": "ViT-B-32", "pretrained": "nope"}}],
                      check=True)
    with pytest.raises(ConfigError, match="captions: false computes no clip score"):
        build_filters([{"clip_score": {**CLIP, "captions": False, "min": 0.2}}])

"""index.json is checked shard by shard (issue 12): a shard's count is checked against that shard's own
bytes, not only the total against all the bytes present, so a large shard next to it cannot hide
a count that no data of this shard could back."""
import json

import pytest

from helpers.loader_output import write_output
from pipeline.loader import BadIndexError, ShardDataset
from pipeline.loader.tar import MIN_MEMBER_BYTES


def test_a_count_too_high_for_its_own_shard_is_refused_though_the_total_fits(tmp_path):
    root = tmp_path / "ds"
    write_output(root, [3, 2], failed_every=None)
    with open(root / "big.tar", "wb") as f:  # sparse: room for many members, no disk used
        f.truncate(64 << 20)
    small = (root / "00001.tar").stat().st_size
    claimed = small // MIN_MEMBER_BYTES + 1
    shardlist = [{"url": "00000.tar", "nsamples": 3}, {"url": "00001.tar", "nsamples": claimed},
                 {"url": "big.tar", "nsamples": 0}]
    (root / "index.json").write_text(json.dumps({"__kind__": "wids-shard-index-v1", "shardlist": shardlist}))
    assert 3 + claimed <= (64 << 20) // MIN_MEMBER_BYTES  # the total check alone would let it through
    with pytest.raises(BadIndexError, match=rf"00001\.tar: nsamples {claimed} is more than its {small} bytes"):
        ShardDataset(str(root))


def test_a_shard_url_with_a_nul_byte_is_a_bad_index_naming_it(tmp_path):
    root = tmp_path / "ds"
    write_output(root, [3], failed_every=None)
    shardlist = [{"url": "00000.tar\x00.x", "nsamples": 3}]
    (root / "index.json").write_text(json.dumps({"__kind__": "wids-shard-index-v1", "shardlist": shardlist}))
    with pytest.raises(BadIndexError, match=r"index\.json.*00000\.tar"):
        ShardDataset(str(root))

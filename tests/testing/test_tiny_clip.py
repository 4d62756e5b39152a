"""The synthetic shapes set (pipeline.testing.synthetic) and the tiny CLIP's training helpers."""
import random
from dataclasses import asdict

import numpy as np
import pytest

from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP
from pipeline.testing.tiny_clip import CONTEXT_LENGTH, caption_words, learn_merges, roc_auc, write_bpe


def test_samples_are_pure_functions_of_seed_and_index():
    a = synthetic.make_pairs(5, seed=3, start=10)
    b = synthetic.make_pairs(5, seed=3, start=10)
    assert [c for _, c in a] == [c for _, c in b]
    assert [im.tobytes() for im, _ in a] == [im.tobytes() for im, _ in b]
    assert synthetic.scene(12, seed=3) == synthetic.make_scenes(5, seed=3, start=10)[2]
    assert [c for _, c in synthetic.make_pairs(5, seed=4, start=10)] != [c for _, c in a]


def test_images_show_what_the_caption_says():
    for s in synthetic.make_scenes(60, seed=1):
        image = np.asarray(s.render(64)).astype(int)
        background = np.array(synthetic.BACKGROUNDS[s.background])
        shape = np.abs(image - background).sum(-1) > 60
        assert shape.sum() > 20, s
        ys, xs = np.nonzero(shape)
        x, y, _ = synthetic.POSITIONS[s.position]
        assert abs(xs.mean() / 64 - x) < 0.1 and abs(ys.mean() / 64 - y) < 0.1, s
        colour = image[shape].mean(0)
        nearest = min(synthetic.COLOURS, key=lambda c: np.abs(np.array(synthetic.COLOURS[c]) - colour).sum())
        assert nearest == s.colour, s
        words = s.caption().split()
        assert s.shape in words and s.colour in words and s.size in words and s.background in s.caption()


def test_sizes_differ_visibly():
    areas = {size: [] for size in synthetic.SIZES}
    for s in synthetic.make_scenes(80, seed=2):
        image = np.asarray(s.render(64)).astype(int)
        areas[s.size].append((np.abs(image - np.array(synthetic.BACKGROUNDS[s.background])).sum(-1) > 60).mean())
    assert max(areas["small"]) < min(areas["large"]) * 1.2
    assert np.mean(areas["large"]) > 2.5 * np.mean(areas["small"])


def test_shuffled_captions_never_stay_with_their_image():
    captions = [c for _, c in synthetic.make_pairs(200, seed=0)]
    captions[5] = captions[6] = captions[7]  # repeated captions must not come back to a twin
    wrong = synthetic.shuffled_captions(captions, seed=1)
    assert sorted(wrong) == sorted(captions)
    assert all(w != c for w, c in zip(wrong, captions))
    assert wrong == synthetic.shuffled_captions(captions, seed=1)
    with pytest.raises(ValueError):
        synthetic.shuffled_captions(["same", "same"])


def test_altered_changes_exactly_one_attribute():
    rng = random.Random(0)
    for s in synthetic.make_scenes(50, seed=5):
        for attribute in synthetic.ATTRIBUTES:
            other = s.altered(rng, attribute)
            changed = [k for k, v in asdict(other).items() if asdict(s)[k] != v]
            assert changed == [attribute] and other.colour != other.background


def test_make_batch_looks_like_the_download_stage_output():
    batch = synthetic.make_batch(synthetic.make_pairs(3, seed=0), fmt="png", shard_id=7)
    assert batch["key"] == ["000070000", "000070001", "000070002"]
    assert all(set(f) == {"png"} for f in batch["files"]) and batch["status"] == ["pending"] * 3
    assert len({len(v) for v in batch.values()}) == 1


def test_tiny_clip_vocabulary_makes_every_caption_word_one_token(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    path = tmp_path / "bpe.txt.gz"
    write_bpe(path, learn_merges(caption_words()))
    tok = SimpleTokenizer(bpe_path=str(path), context_length=CONTEXT_LENGTH)
    assert tok.vocab_size < 700
    for word in caption_words():
        assert len(tok.encode(word)) == 1, word
    longest = max((s.caption() for s in synthetic.make_scenes(300, seed=0)), key=lambda c: len(tok.encode(c)))
    assert len(tok.encode(longest)) + 2 <= CONTEXT_LENGTH  # plus start and end tokens
    assert tok.decode(tok.encode("A red star!")).strip() == "a red star !"  # other text still encodes


def test_roc_auc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 50).round(1), rng.normal(0, 1, 60).round(1)  # rounding makes ties
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert roc_auc(pos, neg) == pytest.approx(np.mean(pairs))
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0


def test_committed_tiny_clip_vocabulary_covers_todays_captions(tmp_path):
    """If the synthetic captions gain a word, the committed model must be retrained."""
    import gzip

    committed = TINY_CLIP / "bpe.txt.gz"
    write_bpe(tmp_path / "bpe.txt.gz", learn_merges(caption_words()))
    assert gzip.decompress(committed.read_bytes()) == gzip.decompress((tmp_path / "bpe.txt.gz").read_bytes())

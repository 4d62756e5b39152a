"""The training-sequence stage: Emu3, Chameleon and offset mappings over the real text and image
stages' ids, the layout of an image, decoding back to the same text and visual ids, dtypes, spans."""
from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from helpers.sequence_fixtures import chameleon_name, save_chameleon_tokenizer, save_emu3_tokenizer
from helpers.tokenize_fixtures import encode_image, make_batch, save_tiny_chameleon
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.media.npy import read_npy
from pipeline.testing.assets import TINY_VQ
from pipeline.testing.synthetic import make_pairs
from pipeline.tokenize import build_tokenizers
from pipeline.tokenize.config import SequenceTokenizeConfig
from pipeline.tokenize.sequence import (IMAGE, SPECIAL, TEXT, compose, decompose, offset_mapping,
                                        sequence_dtype)

CAPTIONS = ["a photo of a cat on a red sofa", "sunset over the sea, with boats", "naïve café: 12 dogs!"]


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    return save_emu3_tokenizer(tmp_path_factory.mktemp("emu3") / "tokenizer")


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chameleon")
    return save_chameleon_tokenizer(tmp / "tokenizer"), save_tiny_chameleon(tmp / "vq")


def section(tokenizer, model, resolution, /, **sequence):
    return {"text": {"tokenizer": str(tokenizer), "add_special_tokens": False, "max_length": None, "truncation": False},
            "image": {"model": str(model), "resolution": resolution, "device": "cpu", "batch_size": 4},
            "sequence": sequence}


def run(stages, captions=CAPTIONS):
    pairs = make_pairs(len(captions), seed=4, size=64)
    batch = make_batch([{"jpg": encode_image(im, quality=95)} for im, _ in pairs], captions)
    for stage in stages:
        batch = stage.process(batch)
    return batch


def outputs(batch, i):
    files = batch[schema.FILES][i]
    return (read_npy(files["sequence.npy"]), read_npy(files["spans.npy"]), read_npy(files["text_ids.npy"]),
            read_npy(files["image_ids.npy"]))


def test_emu3_sequence_has_emu3_layout_and_decodes_back(emu3_dir):
    stages = build_tokenizers(section(emu3_dir, TINY_VQ, 64, mapping="emu3"), check=True)
    assert [s.name for s in stages] == ["tokenize_text", "tokenize_image", "tokenize_sequence"]
    batch = run(stages)
    tok = AutoTokenizer.from_pretrained(emu3_dir)
    ids_of = tok.convert_tokens_to_ids
    mapping = stages[2].mapping
    for i, caption in enumerate(CAPTIONS):
        seq, spans, text, grid = outputs(batch, i)
        assert grid.shape == (8, 8) and seq.dtype == np.uint16  # a tiny vocabulary fits uint16
        assert batch["sequence_length"][i] == len(seq)
        # bos, caption, <|image start|>8*8<|image token|>, 8 rows of 8 codes + <|extra_200|>, <|extra_201|><|image end|>, eos
        size = tok.encode("8*8", add_special_tokens=False)
        visual = [ids_of(f"<|visual token {c:06d}|>") for c in range(512)]
        rows = [tok_id for row in grid for tok_id in [visual[c] for c in row] + [ids_of("<|extra_200|>")]]
        image = [ids_of("<|image start|>"), *size, ids_of("<|image token|>"), *rows, ids_of("<|extra_201|>"),
                 ids_of("<|image end|>")]
        assert seq.tolist() == [ids_of("<|extra_203|>"), *text.tolist(), *image, ids_of("<|extra_204|>")]
        n = len(text)
        assert spans.tolist() == [[0, 1, SPECIAL], [1, 1 + n, TEXT], [1 + n, 1 + n + len(image), IMAGE],
                                  [1 + n + len(image), len(seq), SPECIAL]]
        # decode back: the same caption through the same tokenizer, the same visual ids
        (m1, back_text), (m2, back_grid) = decompose(seq, spans, mapping)
        assert (m1, m2) == (TEXT, IMAGE)
        assert tok.decode(back_text.tolist()) == caption
        assert np.array_equal(back_grid, grid)


def test_image_first_order_puts_the_image_before_the_text(emu3_dir):
    stages = build_tokenizers(section(emu3_dir, TINY_VQ, 64, mapping="emu3", order="image_first", add_bos=False),
                              check=True)
    batch = run(stages)
    tok = AutoTokenizer.from_pretrained(emu3_dir)
    seq, spans, text, grid = outputs(batch, 0)
    assert spans[:, 2].tolist() == [IMAGE, TEXT, SPECIAL]
    assert seq[0] == tok.convert_tokens_to_ids("<|image start|>")
    (_, back_grid), (_, back_text) = decompose(seq, spans, stages[2].mapping)
    assert np.array_equal(back_grid, grid) and tok.decode(back_text.tolist()) == CAPTIONS[0]


def test_chameleon_sequence_uses_img2bpe_and_decodes_back(chameleon):
    tokenizer, vq = chameleon
    stages = build_tokenizers(section(tokenizer, vq, 32, mapping="chameleon"), check=True)
    batch = run(stages)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    ids_of = tok.convert_tokens_to_ids
    for i, caption in enumerate(CAPTIONS):
        seq, spans, text, grid = outputs(batch, i)
        assert grid.shape == (16, 16)
        image = [ids_of("<racm3:break>"), *[ids_of(chameleon_name(c)) for c in grid.ravel()], ids_of("<eoss>")]
        assert seq.tolist() == [ids_of("<s>"), *text.tolist(), *image, ids_of("</s>")]  # no EOL in Chameleon
        (_, back_text), (_, back_codes) = decompose(seq, spans, stages[2].mapping)
        assert tok.decode(back_text.tolist()) == caption
        assert np.array_equal(back_codes.reshape(grid.shape), grid)  # the shape is the image_grid column's
        assert batch["image_grid"][i] == "16x16"


def test_offset_mapping_ids_markers_and_dtype():
    small = offset_mapping(SequenceTokenizeConfig(mapping="offset", vocab_size=1000, visual_offset=600,
                                                  visual_tokens=300, boi=900, eoi=901, eol=902, bos=1, eos=2))
    text, grid = np.array([5, 6, 7]), np.array([[0, 1, 2], [3, 4, 299]])
    seq, spans = compose([text, grid], small)
    assert seq.tolist() == [1, 5, 6, 7, 900, 600, 601, 602, 902, 603, 604, 899, 902, 901, 2]
    assert spans.tolist() == [[0, 1, SPECIAL], [1, 4, TEXT], [4, 14, IMAGE], [14, 15, SPECIAL]]
    assert spans.dtype == np.int32
    (_, t), (_, g) = decompose(seq, spans, small)
    assert t.tolist() == [5, 6, 7] and np.array_equal(g, grid)
    assert sequence_dtype(small.vocab_size) == np.uint16
    assert sequence_dtype(65536) == np.uint16 and sequence_dtype(65537) == np.uint32
    # without eol, bos and eos: markers around the flat codes only
    bare = offset_mapping(SequenceTokenizeConfig(mapping="offset", vocab_size=70000, visual_offset=66000,
                                                 boi=10, eoi=11))
    seq, spans = compose([grid, text], bare)
    assert seq.tolist() == [10, 66000, 66001, 66002, 66003, 66004, 66299, 11, 5, 6, 7]
    assert spans.tolist() == [[0, 8, IMAGE], [8, 11, TEXT]]


def test_large_vocabulary_is_stored_as_uint32(emu3_dir):
    cfg = section(emu3_dir, TINY_VQ, 64, mapping="offset", vocab_size=70000, visual_offset=69000, boi=68000,
                  eoi=68001, eol=68002)
    cfg["text"]["add_special_tokens"] = True  # the offset mapping takes the text ids as they are
    stages = build_tokenizers(cfg, check=True)
    batch = run(stages)
    seq, spans, text, grid = outputs(batch, 1)
    assert seq.dtype == np.uint32 and seq.max() >= 69000
    assert seq[:len(text)].tolist() == text.tolist() and seq[len(text)] == 68000
    fp = stages[2].fingerprint()
    assert (fp["mapping"], fp["vocab_size"], fp["ids_dtype"]) == ("offset", 70000, "uint32")
    assert batch["sequence_tokenizer"][1] == fp["id"]


def test_fingerprint_names_mapping_vocab_and_dtype(emu3_dir, chameleon):
    e = build_tokenizers(section(emu3_dir, TINY_VQ, 64, mapping="emu3"), check=True)[2].fingerprint()
    c = build_tokenizers(section(chameleon[0], chameleon[1], 32, mapping="chameleon"), check=True)[2].fingerprint()
    tok = AutoTokenizer.from_pretrained(emu3_dir)
    assert (e["mapping"], e["vocab_size"], e["ids_dtype"], e["order"]) == ("emu3", len(tok), "uint16", "text_first")
    assert e["eol"] == tok.convert_tokens_to_ids("<|extra_200|>") and len(e["vocab_sha256"]) == 64
    assert c["mapping"] == "chameleon" and c["eol"] is None and c["id"] != e["id"]
    image_first = build_tokenizers(section(emu3_dir, TINY_VQ, 64, mapping="emu3", order="image_first"), check=True)
    assert image_first[2].fingerprint()["id"] != e["id"]


@pytest.mark.parametrize("sequence, message", [
    ({"mapping": "emu3", "visual_offset": 3}, "tokenize.sequence.visual_offset: only used with mapping: offset"),
    ({"mapping": "offset", "vocab_size": 100, "boi": 1, "eoi": 2}, "tokenize.sequence.visual_offset: required"),
    ({"mapping": "offset", "vocab_size": 100, "visual_offset": 50, "boi": 60, "eoi": 2},
     "tokenize.sequence.boi: 60 is a visual id"),
    ({"mapping": "offset", "vocab_size": 100, "visual_offset": 50, "visual_tokens": 60, "boi": 1, "eoi": 2},
     "tokenize.sequence.visual_tokens: 60 visual ids from 50 do not fit"),
    ({"mapping": "llava"}, "tokenize.sequence.mapping: expected"),
])
def test_sequence_options_are_validated(sequence, message):
    with pytest.raises(ConfigError) as e:
        build_tokenizers(section("tok", "model", 64, **sequence))
    assert str(e.value).startswith(message)


def test_sequence_needs_both_stages_and_no_text_specials(emu3_dir):
    with pytest.raises(ConfigError, match=r"^tokenize\.sequence: needs tokenize\.text and tokenize\.image"):
        build_tokenizers({"text": {}, "sequence": {"mapping": "emu3"}})
    cfg = section(emu3_dir, TINY_VQ, 64, mapping="emu3")
    cfg["text"]["add_special_tokens"] = True
    with pytest.raises(ConfigError, match=r"^tokenize\.text\.add_special_tokens: must be false"):
        build_tokenizers(cfg)


def test_mismatched_tokenizers_and_codebooks_fail_before_any_shard(tmp_path, emu3_dir, chameleon):
    other = save_emu3_tokenizer(tmp_path / "other", visual_tokens=600)
    with pytest.raises(ConfigError, match=r"^tokenize\.sequence\.tokenizer: .* is not the text stage's tokenizer"):
        build_tokenizers(section(emu3_dir, TINY_VQ, 64, mapping="emu3", tokenizer=str(other)), check=True)
    small = save_emu3_tokenizer(tmp_path / "small", visual_tokens=100)  # TINY_VQ has 512 codes
    with pytest.raises(ConfigError, match=r"^tokenize\.sequence: the image tokenizer has 512 codes but the emu3 "
                                          r"mapping has 100 visual tokens"):
        build_tokenizers(section(small, TINY_VQ, 64, mapping="emu3"), check=True)
    with pytest.raises(ConfigError, match=r"^tokenize\.sequence\.tokenizer: .* has no '<\|image start\|>' token"):
        build_tokenizers(section(chameleon[0], chameleon[1], 32, mapping="emu3"), check=True)
    with pytest.raises(ConfigError, match=r"^tokenize\.sequence\.visual_offset: 10 overlaps the text tokenizer's ids"):
        build_tokenizers(section(emu3_dir, TINY_VQ, 64, mapping="offset", vocab_size=2000, visual_offset=10,
                                 boi=1, eoi=2), check=True)


def test_a_sample_whose_ids_do_not_fit_is_failed_alone(emu3_dir):
    stages = build_tokenizers(section(emu3_dir, TINY_VQ, 64, mapping="emu3"), check=True)
    batch = run(stages[:2])
    batch[schema.FILES][1]["image_ids.npy"] = batch[schema.FILES][0]["image_ids.npy"][:-2] + b"\xff\xff"  # id 65535
    del batch[schema.FILES][2]["text_ids.npy"]
    batch = stages[2].process(batch)
    assert batch[schema.STATUS] == [schema.SUCCESS, schema.FAILED_TO_PROCESS, schema.FAILED_TO_PROCESS]
    assert "visual id 65535 is outside the emu3 mapping's 512 visual tokens" in batch[schema.ERROR_MESSAGE][1]
    assert "no text_ids.npy" in batch[schema.ERROR_MESSAGE][2]
    assert "sequence.npy" in batch[schema.FILES][0] and batch["sequence_length"][1] is None


def test_stage_pickles_without_its_tokenizer(emu3_dir):
    import pickle

    stage = build_tokenizers(section(emu3_dir, TINY_VQ, 64, mapping="emu3"), check=True)[2]
    copy = pickle.loads(pickle.dumps(stage))
    assert copy._mapping is None and copy.fingerprint()["id"] == stage.fingerprint()["id"]


def test_clip_grids_are_refused_per_sample():
    mapping = offset_mapping(SequenceTokenizeConfig(mapping="offset", vocab_size=100, visual_offset=50, boi=1, eoi=2))
    with pytest.raises(ValueError, match="clips are not composed"):
        compose([np.zeros((2, 2, 2), np.int64)], mapping)

"""The caption-language filter: codes and scores from the shipped py3langid model, the
``languages`` and ``min_score`` rules with the filter's name as error kind, captions without text,
bad options, and the columns in a real job's status table and KEY.json."""
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from filters import build_filters
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing import synthetic
from pipeline.testing.serve import LocalServer

CAPTIONS = {
    "en": "a red circle on a white background next to a small blue square",
    "fr": "un grand cercle rouge sur un fond blanc à côté d'un petit carré bleu",
    "de": "ein großer roter Kreis auf weißem Hintergrund neben einem kleinen blauen Quadrat",
    "es": "un círculo rojo grande sobre un fondo blanco junto a un pequeño cuadrado azul",
    "it": "un grande cerchio rosso su uno sfondo bianco accanto a un piccolo quadrato blu",
    "ru": "большой красный круг на белом фоне рядом с маленьким синим квадратом",
    "ja": "白い背景の上にある大きな赤い丸と小さな青い四角",
    "zh": "白色背景上的一个红色大圆圈，旁边是一个蓝色小方块",
    "ar": "دائرة حمراء كبيرة على خلفية بيضاء بجانب مربع أزرق صغير",
}
NO_TEXT = [None, "", "   ", "12345", "?!…"]


def build(**options):
    [stage] = build_filters([{"language": options}], check=True)
    return stage


def caption_batch(captions):
    pairs = synthetic.make_pairs(len(captions), seed=3, size=32)
    batch = synthetic.make_batch(pairs)
    batch[schema.CAPTION] = list(captions)
    return batch


def test_each_caption_gets_its_language_code_and_a_probability():
    batch = build().process(caption_batch(CAPTIONS.values()))
    assert batch["language"] == list(CAPTIONS)
    assert all(0.3 < s <= 1 for s in batch["language_score"])
    assert set(batch[schema.STATUS]) == {schema.PENDING}  # no rule: every row is kept


def test_languages_keeps_only_those_and_names_the_filter():
    batch = build(languages=["en", "de"]).process(caption_batch(CAPTIONS.values()))
    kept = [code for code, st in zip(CAPTIONS, batch[schema.STATUS]) if st == schema.PENDING]
    assert kept == ["en", "de"]
    for code, st, kind, msg in zip(CAPTIONS, batch[schema.STATUS], batch[schema.ERROR_KIND],
                                   batch[schema.ERROR_MESSAGE]):
        if code not in ("en", "de"):
            assert (st, kind) == (schema.FILTERED, "language") and f"language {code} " in msg
    assert batch["language"] == list(CAPTIONS)  # rejected rows keep their detection in the table


def test_min_score_rejects_uncertain_detections():
    batch = build(min_score=0.5).process(caption_batch([CAPTIONS["en"], "ok"]))
    assert batch[schema.STATUS] == [schema.PENDING, schema.FILTERED]
    assert batch["language_score"][1] < 0.5 and "below min_score 0.5" in batch[schema.ERROR_MESSAGE][1]


@pytest.mark.parametrize("options", [{"languages": ["en"]}, {"min_score": 0.1}])
def test_captions_without_letters_are_rejected_when_a_rule_is_set(options):
    batch = build(**options).process(caption_batch([CAPTIONS["en"], *NO_TEXT]))
    assert batch[schema.STATUS] == [schema.PENDING] + [schema.FILTERED] * len(NO_TEXT)
    assert set(batch[schema.ERROR_KIND][1:]) == {"language"}
    assert batch["language"][1:] == [None] * len(NO_TEXT) and batch["language_score"][1:] == [None] * len(NO_TEXT)


def test_captions_without_letters_are_kept_without_a_rule():
    batch = build().process(caption_batch(NO_TEXT))
    assert batch[schema.STATUS] == [schema.PENDING] * len(NO_TEXT)
    assert batch["language"] == [None] * len(NO_TEXT)


def test_rows_already_failed_are_left_alone():
    batch = caption_batch([CAPTIONS["fr"], CAPTIONS["en"]])
    schema.mark(batch, 0, schema.ErrorKind.DECODE_ERROR, "broken")
    build(languages=["en"]).process(batch)
    assert batch[schema.ERROR_KIND] == ["decode_error", None] and batch["language"] == [None, "en"]


@pytest.mark.parametrize("options, message", [
    ({"languages": ["EN"]}, "filters[0].language.languages[0]: a lowercase ISO 639-1"),
    ({"languages": ["english"]}, "languages[0]"),
    ({"min_score": 1.5}, "filters[0].language.min_score: a probability, in 0..1; got 1.5"),
    ({"languages": ["qq"]}, "filters[0].language.languages: the detector does not know 'qq'"),
    ({"language": ["en"]}, "filters[0].language.language: unknown key (did you mean 'languages'?)"),
])
def test_bad_options_name_their_key_and_value(options, message):
    with pytest.raises(ConfigError, match=None) as e:
        build(**options)
    assert message in str(e.value)


def test_fingerprint_names_the_detector_and_options():
    fp = build(languages=["en"]).fingerprint()
    assert fp["filter"] == "language" and fp["options"]["languages"] == ["en"]
    assert fp["detector"].startswith("py3langid ")


# -- in a job -----------------------------------------------------------------------------------
def test_job_writes_language_columns_to_the_status_table_and_key_json(tmp_path):
    pairs = synthetic.make_pairs(8, seed=5, size=48)
    captions = [CAPTIONS["en"], CAPTIONS["fr"], CAPTIONS["en"], CAPTIONS["de"],
                CAPTIONS["en"], "", CAPTIONS["ja"], CAPTIONS["en"]]
    files = {f"{i}.jpg": synthetic.encode(im, "jpg", 90) for i, (im, _) in enumerate(pairs)}
    with LocalServer(files, content_type="image/jpeg") as server:
        urls = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": [server.url(f"{i}.jpg") for i in range(8)], "caption": captions}), urls)
        spec = {"name": "lang", "input": {"files": [str(urls)]},
                "download": {"image_size": 32, "allow_private_addresses": True, "timeout": 5},
                "filters": [{"language": {"languages": ["en"]}}],
                "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 8},
                "execution": {"engine": "local", "progress": False}}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        assert run_job(load_job(tmp_path / "job.yaml")).ok
    t = pq.read_table(tmp_path / "out" / "00000.parquet").to_pydict()
    assert t["language"] == ["en", "fr", "en", "de", "en", None, "ja", "en"]
    assert pq.read_schema(tmp_path / "out" / "00000.parquet").field("language_score").type == pa.float64()
    assert [k for k in t["error_kind"]] == [None, "language", None, "language", None, "language", "language", None]
    stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert stats["filtered"] == {"language": 4}
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(metas) == 4
    assert all(m["language"] == "en" and isinstance(m["language_score"], float) for m in metas)

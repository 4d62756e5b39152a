"""The job builder, the only reader of a spec: every option reaches its part by name, and a job's
parts (stages, sink schema, executor) are what the spec declares."""
import dataclasses

import pytest

from pipeline.core.config import ConfigError
from pipeline.download.image import ImageDownloadStage
from pipeline.download.video import VIDEO_COLUMNS, VideoDownloadStage
from pipeline.executors import EXECUTORS, LocalExecutor, RayExecutor
from pipeline.job import build
from pipeline.job.spec import DownloadSpec, load_job

# DownloadSpec fields that are not copied into a part's config under their own name
NOT_COPIED = {"media"}  # picks the download stage


def changed(spec_cls):
    """A spec section whose every field differs from its default (lists get an element)."""
    values = {}
    for f in dataclasses.fields(spec_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            values[f.name] = not default
        elif isinstance(default, (int, float)) and f.name != "encode_quality":
            values[f.name] = default + 3
        elif f.name == "encode_quality":
            values[f.name] = 80
        elif f.name == "allowed_networks":
            values[f.name] = ["10.0.0.0/8"]
        elif f.name == "resize_mode":
            values[f.name] = "border"
        elif f.name == "encode_format":
            values[f.name] = "webp"
        elif f.name == "user_agent":
            values[f.name] = "someone/2"
        elif default is None:
            values[f.name] = 7.0
    return spec_cls(**values)


def test_every_download_option_reaches_the_fetch_or_resize_config():
    spec = changed(DownloadSpec)
    fetch, resize = build.fetch_config(spec), build.resize_config(spec)
    image = build.image_download_config(spec, hash_col="sha256")
    parts = {**{f.name: getattr(image, f.name) for f in dataclasses.fields(image)},
             **{f.name: getattr(fetch, f.name) for f in dataclasses.fields(fetch)},
             **{f.name: getattr(resize, f.name) for f in dataclasses.fields(resize)}}
    for f in dataclasses.fields(DownloadSpec):
        if f.name in NOT_COPIED:
            continue
        value = getattr(spec, f.name)
        assert f.name in parts, f"download.{f.name} reaches no config"
        assert parts[f.name] == (tuple(value) if isinstance(value, list) else value), f.name


def test_video_parts_take_the_video_section_and_the_download_caps(tmp_path):
    spec = load_job(data={"input": {"files": ["a.parquet"]},
                          "download": {"media": "video", "max_pixels": 1000, "timeout": 3.0, "concurrency": 99},
                          "video": {"resolution": 64, "clip_precision": "keyframe", "concurrency": 3,
                                    "tmp_dir": str(tmp_path)},
                          "execution": {"cpus_per_task": 2}})
    stage = build.download_stage(spec)
    assert isinstance(stage, VideoDownloadStage) and stage.resources.cpus == 2
    c = stage.config
    assert (c.fetch.media, c.fetch.concurrency, c.fetch.timeout) == ("video", 3, 3.0)
    assert (c.cut.resolution, c.cut.precision, c.cut.max_pixels, c.cut.num_frames) == (64, "keyframe", 1000, 8)
    assert (c.tmp_dir, c.ytdlp.every_url) == (str(tmp_path), False)  # backend auto: yt-dlp for YouTube rows only
    assert build.cut_config(load_job(data={"input": {"files": ["a"]}, "video": {"frames_fps": 2.0}})).num_frames is None


def test_stages_in_spec_order_and_the_sink_schema_is_the_union_of_their_columns():
    spec = load_job(data={"input": {"files": ["a.parquet"]},
                          "filters": [{"caption": {}}, {"dedup_near": {"method": "dhash"}}],
                          "tokenize": {"text": {"max_length": 16}}})
    stages = build.build_stages(spec)
    assert [s.name for s in stages] == ["download", "caption", "dedup_near", "tokenize_text"]
    assert isinstance(stages[0], ImageDownloadStage) and stages[0].config.resize.image_size == 256
    types = build.column_types(stages)
    assert types["dhash"] == types["near_group"] == "string" and types["text_length"] == "int32"
    assert types["width"] == "int32" and "phash" not in types and "clip_score" not in types
    video = build.column_types([build.download_stage(load_job(data={"input": {"files": ["a"]},
                                                                    "download": {"media": "video"}}))])
    assert {k: video[k] for k in VIDEO_COLUMNS} == VIDEO_COLUMNS


def test_checks_run_in_the_driver_and_name_the_entry(tmp_path):
    spec = load_job(data={"input": {"files": ["a.parquet"]},
                          "filters": [{"clip_score": {"pretrained": str(tmp_path / "missing.pt")}}]})
    with pytest.raises(ConfigError, match=r"filters\[0\]\.clip_score\.pretrained: .*missing.pt"):
        build.build_stages(spec)
    assert [s.name for s in build.build_stages(spec, check=False)] == ["download", "clip_score"]


def test_the_engine_comes_from_the_registry():
    assert set(EXECUTORS) == {"ray", "local"}
    for engine, cls in (("local", LocalExecutor), ("ray", RayExecutor)):
        spec = load_job(data={"input": {"files": ["a"]}, "execution": {"engine": engine, "shard_retries": 4}})
        executor = build.build_executor(spec)
        assert type(executor) is cls and executor.options.shard_retries == 4

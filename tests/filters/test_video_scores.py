"""Frame-level CLIP and aesthetic scores of video rows (filters.frames, clip_score, aesthetic, nsfw): a
clip is scored by sampled frames through the same image pass as images, its frames' scores
aggregated; a row cut into scenes is judged clip by clip, by clip_score and by the heads alike. The clips are real H.264 MP4s of the synthetic
shapes the tiny CLIP was trained on."""
import hashlib
import io

import numpy as np
import pytest
import torch

from filters import build_filters
from filters.clip_score import CLIP_EMBEDDINGS, CLIP_SCORES, IMAGE_EMBEDDING
from filters.frames import clip_frames, clip_members, keep_clips, row_chunks
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
from pipeline.testing.clip_heads import aesthetic_state, nsfw_state, save_head

av = pytest.importorskip("av")
torch.set_num_threads(2)

CLIP = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS)}
SEED = 424242  # held out from the tiny CLIP's training


def mp4(frames: list[np.ndarray], fps: int = 8) -> bytes:
    """H.264 MP4 of these RGB frames, as the video stage writes clips."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "threads": "1"}
        for n, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = n
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def shots(index: int, n: int = 8) -> list[np.ndarray]:
    """``n`` frames of one synthetic scene."""
    return [np.asarray(synthetic.scene(index, SEED).render(64))] * n


def caption(index: int) -> str:
    return synthetic.scene(index, SEED).caption()


def video_batch(rows: list[tuple[dict[str, bytes], str]]) -> dict[str, list]:
    """Rows as the video stage leaves them: (members, caption), pending."""
    n = len(rows)
    return {schema.KEY: [f"{i:09d}" for i in range(n)], schema.URL: [f"synthetic://{i}" for i in range(n)],
            schema.CAPTION: [c for _, c in rows], schema.STATUS: [schema.PENDING] * n,
            schema.ERROR_KIND: [None] * n, schema.ERROR_MESSAGE: [None] * n,
            **{c: [64] * n for c in (schema.WIDTH, schema.HEIGHT, schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT)},
            schema.SHA256: [None] * n, schema.FILES: [dict(f) for f, _ in rows]}


def clip_stage(**options):
    [stage] = build_filters([{"clip_score": {**CLIP, "batch_size": 64, **options}}], check=True)
    return stage


def png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "PNG")
    return buf.getvalue()


def frame_scores(data: bytes, text: str, frames: int) -> list[float]:
    """The sampled frames scored one by one as lossless images, through the image path."""
    pictures = [png(f) for f in clip_frames(data, frames)]
    return clip_stage().process(video_batch([({"png": p}, text) for p in pictures]))["clip_score"]


# -- one clip per row ----------------------------------------------------------------------------
def test_frames_are_spread_from_the_first_to_the_last():
    frames = [np.full((32, 32, 3), 16 * k, np.uint8) for k in range(9)]
    got = clip_frames(mp4(frames), 3)
    assert [int(round(f.mean() / 16)) for f in got] == [0, 4, 8]
    assert len(clip_frames(mp4(frames[:2]), 4)) == 4  # fewer frames than asked: repeated


def test_a_clip_scores_the_mean_of_its_frames_through_the_image_pass():
    data = mp4(shots(0, 4) + shots(1, 4))  # half one scene, half another
    text = caption(0)
    per_frame = frame_scores(data, text, 4)
    assert max(per_frame) - min(per_frame) > 0.05  # the two halves score apart
    for how, expected in (("mean", np.mean), ("min", np.min), ("max", np.max)):
        out = clip_stage(frames=4, aggregate=how).process(video_batch([({"mp4": data}, text)]))
        assert out["clip_score"][0] == pytest.approx(float(expected(per_frame)), abs=1e-5), how
        assert out[schema.STATUS] == [schema.PENDING] and out[schema.FILES][0]["mp4"] == data
    assert CLIP_SCORES not in out  # a clip of its own: no per-clip list


def test_matched_captions_outscore_mismatched_ones_and_min_drops_them():
    rows = []
    for k in range(6):  # each clip with its own caption, then with another's
        data = mp4(shots(k))
        rows += [({"mp4": data}, caption(k)), ({"mp4": data}, caption((k + 3) % 6))]
    scores = np.asarray(clip_stage().process(video_batch(rows))["clip_score"])
    assert (scores[0::2] > scores[1::2]).mean() >= 5 / 6, scores
    floor = float(np.median(scores))
    out = clip_stage(min=floor).process(video_batch(rows))
    dropped = [i for i, k in enumerate(out[schema.ERROR_KIND]) if k == "clip_score"]
    assert dropped == [i for i, s in enumerate(scores) if s < floor] and dropped
    assert all(out[schema.FILES][i] == {} for i in dropped)
    assert f"below min {floor:g}" in out[schema.ERROR_MESSAGE][dropped[0]]


def test_video_rows_are_scored_in_chunks_of_batch_size_frames_with_the_same_scores():
    rows = [({"mp4": mp4(shots(k, 4) + shots(k + 2, 4))}, caption(k)) for k in range(3)]
    rows.insert(1, ({"png": png(shots(5, 1)[0])}, caption(5)))  # an image costs no frame
    batch = video_batch(rows)
    assert row_chunks(batch, 4, 8) == [[0, 1, 2], [3]] and row_chunks(batch, 4, 256) == [[0, 1, 2, 3]]
    small = clip_stage(batch_size=8).process(video_batch(rows))["clip_score"]
    np.testing.assert_allclose(small, clip_stage().process(video_batch(rows))["clip_score"], atol=1e-6)


def test_an_undecodable_clip_fails_alone():
    good = mp4(shots(0))
    out = clip_stage().process(video_batch([({"mp4": b"\x00\x00\x00 ftypisom not a video"}, "x"),
                                            ({"mp4": good}, caption(0))]))
    assert out[schema.ERROR_KIND][0] == "decode_error" and out[schema.STATUS][0] == schema.FAILED_TO_DECODE
    assert out[schema.ERROR_MESSAGE][0].startswith("clip_score: mp4: ")
    assert out[schema.STATUS][1] == schema.PENDING and out["clip_score"][1] is not None


def test_the_tensor_decoder_scores_frames_as_the_pil_one_does():
    """decode: torch (the CUDA default) takes decoded frames without the JPEG path; run on the CPU."""
    rows = [({"mp4": mp4(shots(k, 4) + shots(k + 1, 4))}, caption(k)) for k in range(3)]
    pil = clip_stage(decode="pil").process(video_batch(rows))["clip_score"]
    tensor = clip_stage(decode="torch").process(video_batch(rows))["clip_score"]
    np.testing.assert_allclose(tensor, pil, atol=0.005)  # resize rounding only (measured: < 0.001)
    assert None not in tensor


def test_frames_and_aggregate_are_checked():
    with pytest.raises(ConfigError, match=r"clip_score\.frames"):
        clip_stage(frames=0)
    with pytest.raises(ConfigError, match=r"clip_score\.aggregate"):
        clip_stage(aggregate="median")


# -- a row cut into scenes -----------------------------------------------------------------------
def scene_row(scenes: list[int], text: str):
    """Members clip_NNN.mp4 (+ a frames.npy beside each) and the video stage's columns."""
    files, entries = {}, []
    for n, k in enumerate(scenes):
        files[f"clip_{n:03d}.mp4"] = mp4(shots(k))
        files[f"clip_{n:03d}.frames.npy"] = f"frames of scene {n}".encode()
        entries.append({"start": 2.0 * n, "end": 2.0 * n + 1.5, "frame_count": 8, "motion_score": 1.0 + n})
    batch = video_batch([(files, text)])
    batch.update({"scenes": [entries], schema.CLIP_START: [0.0], schema.CLIP_END: [entries[-1]["end"]],
                  "duration": [1.5 * len(scenes)], "frame_count": [8 * len(scenes)], "motion_score": [1.0]})
    return batch


def test_a_scene_row_keeps_its_clips_that_match_and_drops_the_others():
    text = caption(0)
    scores = clip_stage().process(scene_row([0, 4, 0], text))[CLIP_SCORES][0]
    assert scores[1] < min(scores[0], scores[2]), scores  # the other scene matches the caption less
    floor = (scores[1] + min(scores[0], scores[2])) / 2
    batch = scene_row([0, 4, 0], text)
    first, last = batch[schema.FILES][0]["clip_000.mp4"], batch[schema.FILES][0]["clip_002.mp4"]
    out = clip_stage(min=floor).process(batch)
    assert out[schema.STATUS] == [schema.PENDING]
    files = out[schema.FILES][0]
    assert clip_members(files) == ["clip_000.mp4", "clip_001.mp4"]  # renumbered, in time order
    assert (files["clip_000.mp4"], files["clip_001.mp4"]) == (first, last)
    assert files["clip_001.frames.npy"] == b"frames of scene 2"  # every member of a clip moves with it
    assert out[CLIP_SCORES][0] == pytest.approx([scores[0], scores[2]])
    assert out["clip_score"][0] == pytest.approx(min(scores[0], scores[2]))  # every clip written reaches it
    assert [(e["start"], e["motion_score"]) for e in out["scenes"][0]] == [(0.0, 1.0), (4.0, 3.0)]
    assert (out[schema.CLIP_START][0], out[schema.CLIP_END][0], out["duration"][0], out["frame_count"][0]) == \
        (0.0, 5.5, 3.0, 16)
    assert out["motion_score"][0] == 1.0
    assert out[schema.SHA256][0] == hashlib.sha256(first + last).hexdigest()


def test_a_scene_row_without_a_matching_clip_is_filtered_with_its_best_score():
    out = clip_stage(min=0.999).process(scene_row([0, 4], caption(0)))
    assert (out[schema.STATUS][0], out[schema.ERROR_KIND][0]) == (schema.FILTERED, "clip_score")
    assert out[schema.FILES][0] == {}
    assert len(out[CLIP_SCORES][0]) == 2 and out["clip_score"][0] == max(out[CLIP_SCORES][0])
    assert "every clip" in out[schema.ERROR_MESSAGE][0] and "below min 0.999" in out[schema.ERROR_MESSAGE][0]


def test_top_fraction_counts_the_clips_of_scene_rows():
    from pipeline.core.stage import JobContext

    rows = lambda: scene_row([0, 4, 0, 4], caption(0))  # noqa: E731 - two clips match, two do not
    stage = clip_stage(top_fraction=0.5, sample_size=10)
    state = stage.prepare(JobContext(sample_batches=lambda n: iter([rows()])))
    scores = clip_stage().process(rows())[CLIP_SCORES][0]
    assert state["sample_size"] == 4  # clips, not rows
    assert state["threshold"] == pytest.approx(float(np.quantile(scores, 0.5)), abs=1e-6)
    stage.restore(state)
    out = stage.process(rows())
    assert clip_members(out[schema.FILES][0]) == ["clip_000.mp4", "clip_001.mp4"]
    assert [e["start"] for e in out["scenes"][0]] == [0.0, 4.0]


# -- aesthetic: the mean frame embedding ---------------------------------------------------------
def plain_embeddings(pictures: list[bytes]) -> np.ndarray:
    """L2-normalised image embeddings with open_clip alone."""
    import open_clip
    from PIL import Image

    open_clip.add_model_config(TINY_CLIP_CONFIG)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(TINY_CLIP_WEIGHTS))
    model.eval()
    with torch.no_grad():
        x = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in pictures]))
    return (x / x.norm(dim=-1, keepdim=True)).numpy().astype(np.float64)


def direct_aesthetic(x: np.ndarray) -> float:
    for i in (0, 2, 4, 6, 7):  # the published layout: Dropouts (identity) between, no activations
        x = x @ AESTHETIC[f"layers.{i}.weight"].double().numpy().T + AESTHETIC[f"layers.{i}.bias"].double().numpy()
    return float(x[0])


def direct_nsfw(x: np.ndarray) -> float:
    x = (x - NSFW["norm.mean"].double().numpy()) / np.sqrt(NSFW["norm.variance"].double().numpy())
    for k in (1, 2, 3, 4):
        x = x @ NSFW[f"linear_{k}.weight"].double().numpy().T + NSFW[f"linear_{k}.bias"].double().numpy()
        x = np.maximum(x, 0) if k < 4 else 1 / (1 + np.exp(-x))
    return float(x[0])


def clip_embedding(data: bytes) -> np.ndarray:
    """A clip's embedding computed apart: its sampled frames through open_clip, mean, normalised."""
    mean = plain_embeddings([png(f) for f in clip_frames(data, 4)]).mean(0)
    return mean / np.linalg.norm(mean)


AESTHETIC, NSFW = aesthetic_state(64, seed=1), nsfw_state(64, seed=2)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {"aesthetic": str(save_head(root / "aesthetic.pth", AESTHETIC)),
            "nsfw": str(save_head(root / "nsfw.pth", NSFW))}


def head_stages(heads, aesthetic=None, nsfw=None, **clip_options):
    """clip_score (keeping every clip: its clip_scores), then aesthetic and nsfw with these options."""
    return build_filters([{"clip_score": {**CLIP, "min": -1.0, **clip_options}},
                          {"aesthetic": {**CLIP, "checkpoint": heads["aesthetic"], **(aesthetic or {})}},
                          {"nsfw": {**CLIP, "checkpoint": heads["nsfw"], **(nsfw or {})}}], check=True)


def run(stages, batch):
    for stage in stages:
        batch = stage.process(batch)
    return batch


def test_aesthetic_scores_a_clip_by_its_mean_frame_embedding(heads):
    stages = build_filters([{"aesthetic": {**CLIP, "checkpoint": heads["aesthetic"]}}], check=True)
    data = mp4(shots(2, 4) + shots(5, 4))
    batch = run(stages, video_batch([({"mp4": data}, caption(2))]))
    x = clip_embedding(data)
    np.testing.assert_allclose(batch[IMAGE_EMBEDDING][0], x, atol=1e-5)
    assert batch["aesthetic_score"][0] == pytest.approx(direct_aesthetic(x), abs=1e-4)
    assert batch.get("aesthetic_scores", [None]) == [None] and batch[CLIP_EMBEDDINGS] == [None]  # one clip


SCENES = [2, 5, 0, 3]  # four clips of different scenes


def test_the_heads_score_each_clip_of_a_scene_row_and_a_span_row_once(heads):
    batch = scene_row(SCENES, caption(2))
    span = mp4(shots(1))
    batch = {c: v + ([{"mp4": span}] if c == schema.FILES else [v[0]]) for c, v in batch.items()}
    batch[schema.KEY][1] = "000000001"
    clips = [batch[schema.FILES][0][f"clip_{n:03d}.mp4"] for n in range(len(SCENES))]
    out = run(head_stages(heads), batch)
    assert out[schema.STATUS] == [schema.PENDING] * 2
    x = [clip_embedding(c) for c in clips]
    np.testing.assert_allclose(np.stack(out[CLIP_EMBEDDINGS][0]), np.stack(x), atol=1e-5)
    expected = [direct_aesthetic(v) for v in x]
    assert max(expected) - min(expected) > 0.01  # the clips score apart
    assert out["aesthetic_scores"][0] == pytest.approx(expected, abs=1e-4)
    assert out["nsfw_scores"][0] == pytest.approx([direct_nsfw(v) for v in x], abs=1e-5)
    # the row's score: its worst clip's (the lowest aesthetic, the highest NSFW probability)
    assert out["aesthetic_score"][0] == min(out["aesthetic_scores"][0])
    assert out["nsfw_score"][0] == max(out["nsfw_scores"][0])
    # the span row: one embedding, one score, no list
    assert out[CLIP_EMBEDDINGS][1] is None and out["aesthetic_scores"][1] is None
    assert out["aesthetic_score"][1] == pytest.approx(direct_aesthetic(clip_embedding(span)), abs=1e-4)
    assert out["nsfw_score"][1] == pytest.approx(direct_nsfw(clip_embedding(span)), abs=1e-5)


def test_an_aesthetic_min_drops_exactly_the_failing_clips(heads):
    everything = run(head_stages(heads), scene_row(SCENES, caption(2)))
    scores, vectors = everything["aesthetic_scores"][0], everything[CLIP_EMBEDDINGS][0]
    low = sorted(scores)
    floor = (low[1] + low[2]) / 2  # the two lowest clips fail
    batch = scene_row(SCENES, caption(2))
    before = dict(batch[schema.FILES][0])
    out = run(head_stages(heads, aesthetic={"min": floor}, store_embeddings=True), batch)
    kept = [k for k, s in enumerate(scores) if s >= floor]
    assert len(kept) == 2 and out[schema.STATUS] == [schema.PENDING]
    files = out[schema.FILES][0]
    assert clip_members(files) == ["clip_000.mp4", "clip_001.mp4"]  # renumbered, in time order
    for new, old in enumerate(kept):
        assert files[f"clip_{new:03d}.mp4"] == before[f"clip_{old:03d}.mp4"]
        assert files[f"clip_{new:03d}.frames.npy"] == before[f"clip_{old:03d}.frames.npy"]
    assert [e["start"] for e in out["scenes"][0]] == [2.0 * k for k in kept]
    assert out["frame_count"][0] == 16 and out[schema.CLIP_END][0] == 2.0 * kept[-1] + 1.5
    assert out[schema.SHA256][0] == hashlib.sha256(b"".join(before[f"clip_{k:03d}.mp4"] for k in kept)).hexdigest()
    # every per-clip column follows the clips; each row score is its worst kept clip's again
    assert out["aesthetic_scores"][0] == pytest.approx([scores[k] for k in kept])
    assert out["aesthetic_score"][0] == pytest.approx(min(scores[k] for k in kept))
    clip_scores = everything[CLIP_SCORES][0]
    assert out[CLIP_SCORES][0] == pytest.approx([clip_scores[k] for k in kept])
    assert out["clip_score"][0] == pytest.approx(min(clip_scores[k] for k in kept))
    assert out["nsfw_scores"][0] == pytest.approx([everything["nsfw_scores"][0][k] for k in kept])
    np.testing.assert_allclose(np.stack(out[CLIP_EMBEDDINGS][0]), np.stack([vectors[k] for k in kept]))
    mean = np.mean([vectors[k] for k in kept], 0)
    np.testing.assert_allclose(out[IMAGE_EMBEDDING][0], mean / np.linalg.norm(mean), atol=1e-6)
    stored = np.load(io.BytesIO(files["clip.npy"]))  # KEY.clip.npy: the clips written, not those dropped
    np.testing.assert_allclose(stored, mean / np.linalg.norm(mean), atol=2e-3)


def test_an_nsfw_max_drops_the_clips_above_it(heads):
    probabilities = run(head_stages(heads), scene_row(SCENES, caption(2)))["nsfw_scores"][0]
    high = sorted(probabilities)
    ceiling = (high[-1] + high[-2]) / 2  # the most likely NSFW clip fails
    out = run(head_stages(heads, nsfw={"max": ceiling}), scene_row(SCENES, caption(2)))
    kept = [k for k, p in enumerate(probabilities) if p <= ceiling]
    assert len(kept) == 3 and len(clip_members(out[schema.FILES][0])) == 3
    assert out["nsfw_scores"][0] == pytest.approx([probabilities[k] for k in kept])
    assert out["nsfw_score"][0] == pytest.approx(high[-2])


def test_dropping_clips_sums_every_earlier_filters_row_score_up_again():
    """A later filter's keep_clips: each per-clip list follows the clips, each row score is again
    its worst kept clip's (lowest clip score, highest NSFW probability), the embeddings re-meaned."""
    import filters.clip_heads  # noqa: F401 - registers aesthetic_scores and nsfw_scores

    batch = scene_row([0, 1, 2], "x")
    vectors = [np.eye(4, dtype=np.float32)[k] for k in range(3)]
    batch.update({CLIP_SCORES: [[0.3, 0.1, 0.5]], "clip_score": [0.1], "nsfw_scores": [[0.2, 0.9, 0.4]],
                  "nsfw_score": [0.9], CLIP_EMBEDDINGS: [vectors], IMAGE_EMBEDDING: [np.ones(4, np.float32) / 2]})
    keep_clips(batch, 0, [0, 2])
    assert (batch[CLIP_SCORES][0], batch["clip_score"][0]) == ([0.3, 0.5], 0.3)
    assert (batch["nsfw_scores"][0], batch["nsfw_score"][0]) == ([0.2, 0.4], 0.4)
    assert [list(v) for v in batch[CLIP_EMBEDDINGS][0]] == [[1, 0, 0, 0], [0, 0, 1, 0]]
    np.testing.assert_allclose(batch[IMAGE_EMBEDDING][0], [2 ** -0.5, 0, 2 ** -0.5, 0], atol=1e-6)
    keep_clips(batch, 0, [1])  # one clip left: its own embedding
    assert batch["clip_score"][0] == 0.5 and list(batch[IMAGE_EMBEDDING][0]) == [0, 0, 1, 0]


def test_a_scene_row_without_a_passing_clip_is_filtered_by_the_head(heads):
    out = run(head_stages(heads, aesthetic={"min": 100}), scene_row(SCENES, caption(2)))
    assert (out[schema.STATUS][0], out[schema.ERROR_KIND][0]) == (schema.FILTERED, "aesthetic")
    assert out[schema.FILES][0] == {} and len(out["aesthetic_scores"][0]) == len(SCENES)
    assert out["aesthetic_score"][0] == max(out["aesthetic_scores"][0])  # how close its best clip came
    assert "every clip fails" in out[schema.ERROR_MESSAGE][0] and "below min 100" in out[schema.ERROR_MESSAGE][0]
    assert out["nsfw_score"][0] is None  # rejected before nsfw
    out = run(head_stages(heads, nsfw={"max": 0.0}), scene_row(SCENES, caption(2)))
    assert out[schema.ERROR_KIND][0] == "nsfw" and out["nsfw_score"][0] == min(out["nsfw_scores"][0])


def test_a_head_top_fraction_counts_the_clips_of_scene_rows(heads):
    from pipeline.core.stage import JobContext

    clip, aesthetic = build_filters([{"aesthetic": {**CLIP, "checkpoint": heads["aesthetic"], "top_fraction": 0.5,
                                                    "sample_size": 10}}], check=True)
    assert not clip.config.captions  # the image-only pass leaves each clip's embedding too
    state = aesthetic.prepare(JobContext(sample_batches=lambda n: iter([clip.process(scene_row(SCENES, "x"))])))
    assert state["sample_size"] == len(SCENES)  # clips, not rows
    aesthetic.restore(state)
    out = aesthetic.process(clip.process(scene_row(SCENES, "x")))
    assert len(clip_members(out[schema.FILES][0])) == 2
    assert min(out["aesthetic_scores"][0]) >= state["threshold"]


def test_a_video_job_writes_the_heads_scores_per_clip_and_the_report_draws_them(heads, tmp_path):
    """The whole path: scene cuts of a served video, clip_score and the heads, the sink, the report."""
    import json
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cli.report import summarize
    from pipeline.job.runner import run_job
    from pipeline.job.spec import load_job
    from pipeline.testing.serve import LocalServer

    shots_of = [0, 4, 0]  # hard cuts between scenes on black and on gray: three clips
    video = mp4([frame for k in shots_of for frame in shots(k, 40)], fps=25)
    with LocalServer({"shots.mp4": video}, content_type="video/mp4") as server:
        pq.write_table(pa.table({"url": [server.url("shots.mp4")], "caption": [caption(0)]}), tmp_path / "in.parquet")
        result = run_job(load_job(data={
            "name": "video-heads", "input": {"files": [str(tmp_path / "in.parquet")]},
            "download": {"media": "video", "allow_private_addresses": True, "timeout": 10},
            "video": {"scenes": {"min_clip": 1.0, "max_clip": 3.0}},
            "filters": [{"clip_score": {**CLIP, "frames": 3}},
                        {"aesthetic": {**CLIP, "checkpoint": heads["aesthetic"]}},
                        {"nsfw": {**CLIP, "checkpoint": heads["nsfw"], "max": 0.999}}],
            "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 10},
            "execution": {"engine": "local", "progress": False}}))
    assert result.ok
    [row] = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert row[schema.STATUS] == schema.SUCCESS and len(row["scenes"]) == 3
    assert len(row["aesthetic_scores"]) == len(row["nsfw_scores"]) == 3
    assert row["aesthetic_score"] == min(row["aesthetic_scores"]) and row["nsfw_score"] == max(row["nsfw_scores"])
    assert CLIP_EMBEDDINGS not in row and IMAGE_EMBEDDING not in row  # transient: never written
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        meta = json.load(tar.extractfile(f"{row[schema.KEY]}.json"))
    assert meta["aesthetic_scores"] == pytest.approx(row["aesthetic_scores"]) and CLIP_EMBEDDINGS not in meta
    summary = summarize(tmp_path / "out")
    assert summary.histograms["aesthetic_scores"].total == summary.histograms["nsfw_scores"].total == 3
    assert summary.histograms["nsfw_scores"].marks == [(0.999, "max 0.999")]

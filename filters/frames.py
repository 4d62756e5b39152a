"""Pictures of a row for the CLIP pass: its image, or sampled frames of each of its video clips.

A video row (``download.media: video``) carries one clip, ``KEY.mp4``, or, cut into scenes, several,
``KEY.clip_000.mp4``, ``KEY.clip_001.mp4`` ... (the rule: :mod:`pipeline.media.scenes`). The CLIP
filters see each clip through ``frames`` RGB frames spread evenly from its first frame to its last
(:func:`clip_frames`, the spacing of :func:`pipeline.media.video.frame_indices`), embedded by the
same image pass as images. A clip's score is an aggregate (``mean``, ``min`` or ``max``) of its
frames' scores; its embedding the mean of its frames' embeddings, L2-normalised again.

When a filter drops some clips of a scene row and keeps the others, :func:`keep_clips` renumbers
the kept members (``clip_NNN.*`` stay consecutive, in time order) and brings the row's summary
columns back in line with them, as the video stage wrote them for its clips: ``scenes`` (one
entry per clip), ``clip_start`` of the first, ``clip_end`` of the last, ``duration`` and
``frame_count`` summed, ``sha256`` of their MP4 bytes one after the other, ``motion_score`` the
least moving clip's. It keeps a scene row's per-clip columns in step too: every score list
registered with :func:`per_clip_scores` (``clip_scores``, ``aesthetic_scores``, ``nsfw_scores``), its row
score again its worst kept clip's (:func:`judge_clips`), and the clips' embeddings
(``schema.CLIP_IMAGE_EMBEDDINGS``), the row's one (``schema.CLIP_IMAGE_EMBEDDING``, ``clip.npy``) again
their normalised mean.
"""
from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union

import numpy as np

from pipeline.core import schema
from pipeline.core.schema import Batch, ErrorKind
from pipeline.media.npy import npy_bytes
from pipeline.media.scenes import scene_summary
from pipeline.media.video import MediaError, frame_indices

Aggregate = Literal["mean", "min", "max"]
AGGREGATES = {"mean": np.mean, "min": np.min, "max": np.max}
CLIP_MEMBER = re.compile(r"^clip_(\d{3,})\.mp4$")
CLIP_PREFIX = re.compile(r"^clip_(\d{3,})\.")
SCENES = "scenes"          # the video stage's per-clip entries (start, end, frame_count, motion_score)
Picture = Union[bytes, np.ndarray]  # an encoded image, or a decoded RGB frame (H, W, 3) uint8
EMBEDDING_FILE = "clip.npy"  # clip_score's store_embeddings member: the row's embedding, float16
CLIP_EMBEDDINGS, ROW_EMBEDDING = schema.CLIP_IMAGE_EMBEDDINGS, schema.CLIP_IMAGE_EMBEDDING


@dataclass(frozen=True)
class PerClip:
    """A filter's per-clip score column of scene rows, and the row column that sums it up."""

    row_column: str
    higher_is_better: bool  # the row's score is its worst kept clip's: the lowest, or the highest

    def worst(self, scores: list[float]) -> float:
        return min(scores) if self.higher_is_better else max(scores)


PER_CLIP: dict[str, PerClip] = {}  # filled when the filter modules are imported (filters/__init__ imports all)


def per_clip_scores(column: str, row_column: str, higher_is_better: bool) -> str:
    """Register ``column``, a filter's score per clip of a scene row: :func:`keep_clips` keeps it in
    step with the clips and sums it up again into ``row_column``. Returns ``column``."""
    PER_CLIP[column] = PerClip(row_column, higher_is_better)
    return column


def clip_members(files: dict[str, bytes]) -> list[str]:
    """The video clips of a sample in time order: ``["mp4"]``, the scene clips, or none."""
    scenes = sorted((m for m in files if CLIP_MEMBER.match(m)), key=lambda m: int(CLIP_MEMBER.match(m)[1]))
    if scenes:
        return scenes
    return ["mp4"] if files.get("mp4") else []


def clip_frames(mp4: bytes, count: int) -> list[np.ndarray]:
    """``count`` evenly spaced RGB frames of an encoded clip (repeats when it has fewer); a clip that
    cannot be decoded raises MediaError (decode_error). The clip is decoded once; only the chosen
    frames are converted. Our clips are under the pixel cap already, so no size check here."""
    import av

    try:
        with av.open(io.BytesIO(mp4)) as container:
            if not container.streams.video:
                raise MediaError(ErrorKind.DECODE_ERROR, "the clip has no video stream")
            stream = container.streams.video[0]
            total = stream.frames  # the MP4 header's count; 0 when the container does not say
            if total <= 0:
                total = sum(1 for _ in container.decode(stream))
                container.seek(0)
            wanted = frame_indices(total, 1.0, count, None)
            picked: dict[int, np.ndarray] = {}
            for n, frame in enumerate(container.decode(stream)):
                if n in wanted:
                    picked[n] = frame.to_ndarray(format="rgb24")
                if n >= wanted[-1]:
                    break
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad clip fails its row, never the shard
        raise MediaError(ErrorKind.DECODE_ERROR, f"cannot sample frames: {type(e).__name__}: {e}") from None
    if not picked:
        raise MediaError(ErrorKind.DECODE_ERROR, "no frame of the clip could be decoded")
    last = picked[max(picked)]  # a header that counts more frames than decode: the last one stands in
    return [picked.get(k, last) for k in wanted]


@dataclass
class Pictures:
    """What the CLIP pass embeds for a batch, and which row and clip each picture belongs to."""

    rows: list[int] = field(default_factory=list)               # alive rows with an image or clips
    pictures: list[Picture] = field(default_factory=list)       # flat, row by row, clip by clip
    clips: list[list[list[int]]] = field(default_factory=list)  # per row, per clip: positions in pictures
    video: list[bool] = field(default_factory=list)             # per row: clips of a video, not an image
    members: list[list[str]] = field(default_factory=list)      # per row: its clip members (video rows)
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> why its frames are missing


def row_chunks(batch: Batch, frames: int, budget: int) -> list[list[int]]:
    """The alive rows in chunks holding at most ``budget`` decoded frames each (a row's clips stay
    together; images count nothing: their bytes are small), so a shard of long scene rows never
    holds all its frames at once. A batch of images is one chunk."""
    chunks: list[list[int]] = [[]]
    held = 0
    for i in schema.alive(batch):
        files = batch[schema.FILES][i]
        cost = 0 if schema.image_of(files) is not None else frames * len(clip_members(files))
        if chunks[-1] and held + cost > budget:
            chunks.append([])
            held = 0
        chunks[-1].append(i)
        held += cost
    return [c for c in chunks if c]


def pictures(batch: Batch, frames: int, threads: int = 1, rows: Optional[list[int]] = None) -> Pictures:
    """The image of each alive row (of ``rows``, default all) that has one, else ``frames`` frames of
    each of its clips (decoded on ``threads`` threads: PyAV releases the GIL while it decodes)."""
    todo = []  # (row, its image or None, its clip members)
    for i in schema.alive(batch) if rows is None else rows:
        files = batch[schema.FILES][i]
        image = schema.image_of(files)
        members = [] if image is not None else clip_members(files)
        if image is not None or members:  # a row with nothing to look at is left alone
            todo.append((i, image, members))
    clips = [(i, m) for i, image, members in todo for m in members]

    def sample(clip: tuple[int, str]) -> Union[list[np.ndarray], MediaError]:
        try:
            return clip_frames(batch[schema.FILES][clip[0]][clip[1]], frames)
        except MediaError as e:
            return e

    if threads > 1 and len(clips) > 1:
        with ThreadPoolExecutor(min(threads, len(clips)), thread_name_prefix="clip-frames") as pool:
            sampled = dict(zip(clips, pool.map(sample, clips)))
    else:
        sampled = {clip: sample(clip) for clip in clips}
    out = Pictures()
    for i, image, members in todo:
        failed = next((m for m in members if isinstance(sampled[i, m], MediaError)), None)
        if failed is not None:
            error = sampled[i, failed]
            out.errors[i] = (error.kind, f"{failed}: {error.message}")
            continue
        out.rows.append(i)
        out.video.append(image is None)
        out.members.append(members)
        groups = []
        for shots in [[image]] if image is not None else [sampled[i, m] for m in members]:
            groups.append(list(range(len(out.pictures), len(out.pictures) + len(shots))))
            out.pictures.extend(shots)
        out.clips.append(groups)
    return out


def unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)


def aggregate_score(scores: np.ndarray, positions: list[int], how: Aggregate) -> float:
    return float(AGGREGATES[how](scores[positions]))


def mean_embedding(embeddings: np.ndarray, positions: list[int]) -> np.ndarray:
    """A clip's embedding: the mean of its frames' (L2-normalised) embeddings, normalised again."""
    return unit(embeddings[positions].mean(axis=0))


def row_embedding(clips: list[np.ndarray]) -> np.ndarray:
    """A row's embedding over its (kept) clips: one clip's own, else their mean, normalised again."""
    return clips[0] if len(clips) == 1 else unit(np.mean(clips, axis=0))


def judge_clips(batch: Batch, i: int, column: str, scores: list[float],
                problem: Callable[[float], Optional[str]]) -> tuple[list[int], Optional[str]]:
    """Judge scene row ``i`` clip by clip by ``scores`` (one per clip, in member order): ``column``
    (registered with :func:`per_clip_scores`) gets them, the clips ``problem`` refuses are dropped
    (:func:`keep_clips`) and the row's score is its worst kept clip's, so every clip written passes.
    Returns the kept positions and, when none is left, why the row is to be rejected (its score
    then its best clip's, to show how far it was)."""
    rule = PER_CLIP[column]
    why = [problem(s) for s in scores]
    kept = [k for k, w in enumerate(why) if w is None]
    schema.set_column(batch, column, [i], [list(scores)])
    if not kept:
        best = (max if rule.higher_is_better else min)(range(len(scores)), key=scores.__getitem__)
        schema.set_column(batch, rule.row_column, [i], [scores[best]])
        return kept, f"every clip fails; the best, clip_{best:03d}: {why[best]}"
    if len(kept) < len(scores):
        keep_clips(batch, i, kept)
    schema.set_column(batch, rule.row_column, [i], [rule.worst([scores[k] for k in kept])])
    return kept, None


def keep_clips(batch: Batch, i: int, kept: list[int]) -> None:
    """Keep only the clips ``kept`` (positions in time order) of scene row ``i``: members renumbered,
    ``scenes``, the registered score columns, the embeddings and the summary columns brought in
    line (module docstring)."""
    files = batch[schema.FILES][i]
    numbers = sorted({int(m[1]) for m in map(CLIP_PREFIX.match, files) if m})
    _keep_per_clip(batch, i, kept, len(numbers))
    renamed: dict[str, bytes] = {}
    for new, old in enumerate(numbers[k] for k in kept):
        for name in [m for m in files if (p := CLIP_PREFIX.match(m)) and int(p[1]) == old]:
            renamed[f"clip_{new:03d}." + name.split(".", 1)[1]] = files[name]
    for name in [m for m in files if CLIP_PREFIX.match(m)]:
        del files[name]
    files.update(renamed)
    entries = batch.get(SCENES, [None] * schema.batch_len(batch))[i]
    if entries is None or len(entries) < len(numbers):
        return  # no scene entries to sum up (not written by the video stage)
    entries = [entries[k] for k in kept]
    batch[SCENES][i] = entries
    for column, value in scene_summary(entries, [files[name] for name in clip_members(files)]).items():
        if column in batch:
            batch[column][i] = value


def _keep_per_clip(batch: Batch, i: int, kept: list[int], clips: int) -> None:
    """Row ``i``'s per-clip lists (those aligned with its ``clips`` clips) trimmed to ``kept``; the
    row scores and embedding summed up again over what is left."""
    def aligned(column: str) -> Optional[list]:
        values = batch[column][i] if column in batch else None
        return values if isinstance(values, list) and len(values) == clips else None

    for column in [c for c in batch if c in PER_CLIP or c == CLIP_EMBEDDINGS]:
        values = aligned(column)
        if values is None:
            continue
        values = batch[column][i] = [values[k] for k in kept]
        if column == CLIP_EMBEDDINGS:
            embedding = row_embedding(values)
            if ROW_EMBEDDING in batch and batch[ROW_EMBEDDING][i] is not None:
                batch[ROW_EMBEDDING][i] = embedding
            if EMBEDDING_FILE in batch[schema.FILES][i]:
                batch[schema.FILES][i][EMBEDDING_FILE] = npy_bytes(embedding.astype(np.float16))
        elif PER_CLIP[column].row_column in batch and None not in values:
            batch[PER_CLIP[column].row_column][i] = PER_CLIP[column].worst(values)

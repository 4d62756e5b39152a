"""Cut clips out of a local video file (PyAV), encode them as H.264 MP4 with their audio, and
sample frames (decord).

Pure functions over files on disk, so the download stage can run them in a thread pool (PyAV and
decord release the GIL while they decode and encode) and tests can run them without a server.

* A clip is a span ``[start, end)`` in seconds from the first frame of the source (``None`` for
  the whole video). A frame belongs to the clip when its midpoint lies inside the span, so a clip
  starts and ends within half a frame of the span.
* **Remux** (stream copy, no quality loss, no decode) when the source is upright H.264, no resize
  or fps change is asked for, and the span starts on a keyframe (``exact``) or may be moved back
  to one (``keyframe``). Otherwise **re-encode** (:mod:`pipeline.media.reencode`): the same input
  always gives the same bytes (resume compares shards byte for byte).
* **Audio** (:mod:`pipeline.media.audio`): the source's first audio track over the same span, as
  AAC (copied beside a remuxed video when it is AAC already, else encoded); none when the source
  has none or ``audio`` is off.
* **Rotation** (:mod:`pipeline.media.rotation`): a source with rotation metadata is re-encoded
  upright; sizes are display sizes.
* Failures raise :class:`MediaError` with an error kind from :mod:`pipeline.core.schema`.

The types and the source reading live in :mod:`pipeline.media.video_source`, frame sampling in
:mod:`pipeline.media.frame_sampling`; both are importable from here.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Optional, Union

from pipeline.core.schema import ErrorKind
from pipeline.media.audio import AudioTrack, audio_plan, clip_fields
from pipeline.media.frame_sampling import frame_indices, sample_frames
from pipeline.media.reencode import reencode
from pipeline.media.video_source import (AudioInfo, Clip, CutConfig, MediaError, SourceInfo, Span, hard_end,
                                         open_at, open_output, open_source, probe, probe_file, resolve_span,
                                         video_stream)

__all__ = ["AudioInfo", "Clip", "CutConfig", "MediaError", "SourceInfo", "Span", "cut_clip", "cut_clips",
           "frame_indices", "probe", "probe_file", "resolve_span", "sample_frames", "try_cut_clip"]
_open, _video_stream = open_source, video_stream  # the names other modules used before the split


def cut_clips(path: Union[str, Path], spans: list[Span], config: CutConfig, workdir: Union[str, Path]
              ) -> tuple[Optional[SourceInfo], list[Union[Clip, MediaError]]]:
    """Cut every span of one source file, one after the other; one result per span.

    A failure to open or probe the source fails every span with the same error.
    """
    try:
        info = probe_file(path, config.max_pixels)
    except MediaError as e:
        return None, [e] * len(spans)
    return info, [try_cut_clip(path, info, span, config, Path(workdir) / f"clip{n}.mp4")
                  for n, span in enumerate(spans)]


def try_cut_clip(path: Union[str, Path], info: SourceInfo, span: Span, config: CutConfig,
                 out_path: Union[str, Path]) -> Union[Clip, MediaError]:
    """:func:`cut_clip`, with its failure returned instead of raised (for thread pools)."""
    try:
        return cut_clip(path, info, span, config, out_path)
    except MediaError as e:
        return e


def cut_clip(path: Union[str, Path], info: SourceInfo, span: Span, config: CutConfig,
             out_path: Union[str, Path]) -> Clip:
    """One clip of ``path`` as MP4 bytes (plus sampled frames when configured)."""
    import av

    start, end = resolve_span(span, info, config.max_duration)
    out_path = Path(out_path)
    try:
        clip = None
        if info.copyable and not config.transforms:
            clip = _remux(path, info, start, end, config, out_path)
        if clip is None:
            clip = reencode(path, info, start, end, config, out_path)
        if config.store_frames:
            clip.frames = sample_frames(out_path, config)
        clip.data = out_path.read_bytes()
        return clip
    except MediaError:
        raise
    except av.FFmpegError as e:
        raise MediaError(ErrorKind.DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a sample must fail alone, never the shard
        raise MediaError(ErrorKind.CUT_ERROR, f"{type(e).__name__}: {e}") from None
    finally:
        out_path.unlink(missing_ok=True)


def _remux(path, info: SourceInfo, start: float, end: float, config: CutConfig, out_path: Path) -> Optional[Clip]:
    """Copy the packets of the span without decoding; None when the span does not allow it.

    The copy must begin on a keyframe: in ``exact`` mode one within half a frame of ``start``,
    in ``keyframe`` mode the last one at or before it. Every prefix of the decode order is
    decodable, so the end is cut at the first packet past ``end`` when decode order equals display
    order (no B-frames); with B-frames the end moves to the next keyframe, which ``exact`` mode
    refuses (it then re-encodes). Packets are streamed to the output, never all held; the audio
    goes in between them, by time.
    """
    exact = config.precision == "exact"
    plan = audio_plan(info, config, copy_video=True)
    with open_at(path, start - 2 / float(info.fps)) as container:
        vs = video_stream(container)
        tb, origin = vs.time_base, vs.start_time or 0
        tol = int(0.5 / float(info.fps) / tb)  # half a frame, in stream ticks
        start_pts = origin + int(round(start / tb))
        end_pts = origin + int(round(end / tb)) if math.isfinite(end) else None
        last = hard_end(start, end, config.max_duration)
        limit = origin + int(round(last / tb)) if math.isfinite(last) and last < end else None
        packets = _from_keyframe(container.demux(vs), start_pts + tol)
        head = next(packets, None)
        if head is None or (exact and abs(head.pts - start_pts) > tol):
            return None
        first, last_end, count, at_eof = head.pts, head.pts, 0, True
        in_order = not vs.codec_context.has_b_frames
        with open_output(out_path) as out:
            ostream = out.add_stream_from_template(vs)
            track = AudioTrack(path, info, out, plan, config) if plan else None
            try:
                if track is not None:
                    track.begin(float((first - origin) * tb))
                for pkt in itertools.chain([head], packets):
                    if count:
                        in_order = in_order and pkt.pts == pkt.dts
                        if pkt.pts < first:
                            continue  # open-GOP leading frames: they reference the previous GOP
                        if end_pts is not None and pkt.pts >= end_pts - tol:
                            if in_order or pkt.is_keyframe:
                                at_eof = False
                                break
                            if exact:
                                return None
                    if limit is not None and pkt.pts >= limit:
                        raise MediaError(ErrorKind.TOO_LONG,
                                         f"the video runs past max_duration {config.max_duration}s")
                    if track is not None:
                        track.until(float((pkt.dts - origin) * tb))
                    last_end = max(last_end, pkt.pts + (pkt.duration or 0))
                    pkt.pts, pkt.dts, pkt.stream = pkt.pts - first, pkt.dts - first, ostream
                    out.mux(pkt)
                    count += 1
                if exact and not at_eof and abs(last_end - end_pts) > tol:
                    return None  # e.g. open-GOP frames missing before the next keyframe
                if track is not None:
                    track.finish(float((last_end - origin) * tb))
            finally:
                if track is not None:
                    track.close()
    return Clip(data=b"", start=float((first - origin) * tb), end=float((last_end - origin) * tb),
                frame_count=count, fps=float(info.fps), width=info.width, height=info.height, method="remux",
                **clip_fields(track))


def _from_keyframe(demux, start_limit: int):
    """Packets in decode order from the last keyframe whose pts is at most ``start_limit``.

    Packets are held only until that keyframe is certain: once a packet's dts passes the limit no
    later keyframe can qualify (a keyframe's pts is at least its dts). Yields nothing when the
    first timed packet is already past the limit.
    """
    held: list = []
    settled = False
    for pkt in demux:
        if pkt.pts is None or pkt.dts is None or not pkt.size:
            continue
        if settled:
            yield pkt
            continue
        if pkt.is_keyframe and pkt.pts <= start_limit:
            held = [pkt]
        elif held:
            held.append(pkt)
        elif pkt.pts > start_limit:
            return
        if held and pkt.dts > start_limit:
            settled = True
            yield from held
            held = []
    yield from held  # the source ended before the start was settled

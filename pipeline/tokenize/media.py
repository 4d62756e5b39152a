"""The pixels a visual tokenizer reads from a sample's files: one image, or frames of a clip.

A video sample carries ``mp4`` and, when the video stage kept them, ``frames.npy`` (uint8
(T, H, W, 3)); the decoded frames are used when present, else the mp4 is decoded with PyAV.
Either way ``frames`` frames are taken uniformly over the clip (the centre of T equal segments).
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

from pipeline.core import schema
from pipeline.core.schema import ErrorKind
from pipeline.media.image_open import ImageRejected, open_image
from pipeline.media.npy import read_npy


class MediaError(ValueError):
    """The sample holds nothing a visual tokenizer can read."""


def media_error_kind(error: Exception) -> str:
    """The ErrorKind of a sample whose media could not be read: an image refused by the
    whitelist or the pixel cap keeps its own kind; anything else is the stage's error."""
    if isinstance(error, ImageRejected):
        return error.kind
    if isinstance(error, Image.DecompressionBombError):  # PIL's own backstop, while decoding
        return ErrorKind.DECOMPRESSION_BOMB
    return ErrorKind.STAGE_ERROR


def uniform_indices(available: int, frames: int) -> list[int]:
    """``frames`` indices spread over ``available`` frames (repeating frames of a short clip)."""
    if available <= 0:
        raise MediaError("the clip has no frames")
    return [min(available - 1, int((k + 0.5) * available / frames)) for k in range(frames)]


def read_media(files: dict[str, bytes], frames: int) -> tuple[list[Image.Image], bool]:
    """(images, is_video): one image for an image sample (opened lazily through the format
    whitelist and the pixel cap, so that the resize can decode a JPEG at reduced scale),
    ``frames`` RGB frames for a clip."""
    if "frames.npy" in files:
        return _from_array(read_npy(files["frames.npy"]), frames), True
    if "mp4" in files:
        return _from_mp4(files["mp4"], frames), True
    image = schema.image_of(files)
    if image is not None:
        return [open_image(image)], False
    raise MediaError(f"no image or video to tokenize (files: {', '.join(sorted(files)) or 'none'})")


def _from_array(array: np.ndarray, frames: int) -> list[Image.Image]:
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise MediaError(f"frames.npy: expected uint8 (T, H, W, 3), got {array.dtype} {array.shape}")
    return [Image.fromarray(array[i]) for i in uniform_indices(len(array), frames)]


def _from_mp4(data: bytes, frames: int) -> list[Image.Image]:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if stream.frames > 0:  # the count is known: keep only the sampled frames
                wanted = uniform_indices(stream.frames, frames)
                picked = _decode(container, stream, set(wanted), max(wanted))
                if len(picked) == len(set(wanted)):
                    return [picked[i] for i in wanted]
                container.seek(0)  # the header's count was wrong: decode it all
            decoded = _decode(container, stream, None, None)
    except (av.error.FFmpegError, IndexError) as e:
        raise MediaError(f"cannot decode the mp4: {e}") from None
    order = sorted(decoded)
    return [decoded[order[i]] for i in uniform_indices(len(order), frames)]


def _decode(container, stream, keep: Optional[set[int]], last: Optional[int]) -> dict[int, Image.Image]:
    out = {}
    for index, frame in enumerate(container.decode(stream)):
        if keep is None or index in keep:
            out[index] = frame.to_image()
        if last is not None and index >= last:
            break
    return out

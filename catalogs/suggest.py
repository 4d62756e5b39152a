"""Ready-to-run job specs for a card: sensible download settings per modality and media source."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .card import Card

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"

IMAGE_DOWNLOAD = {"image_size": 256, "resize_mode": "center_crop", "encode_format": "jpg", "encode_quality": 95,
                  "timeout": 10, "retries": 1}
# Web-hosted video files are larger and slower than images; keep fewer in flight.
VIDEO_DOWNLOAD = {"media": "video", "timeout": 60, "retries": 1, "max_bytes": 300_000_000, "concurrency": 64,
                  "per_host_limit": 8}
# YouTube throttles aggressively (HTTP 429, bot checks): few requests per host.
YOUTUBE_DOWNLOAD = {"media": "video", "timeout": 120, "retries": 2, "max_bytes": 500_000_000, "concurrency": 16,
                    "per_host_limit": 4}
# A document is kept with at least one of its images; its failed images stay as slots with a status.
DOCUMENTS = {"min_images": 1, "all_images": False}
# Few videos in flight and few extractions a second through yt-dlp, as the shipped jobs do.
YOUTUBE_VIDEO = {"backend": "auto", "ytdlp_concurrency": 2, "ytdlp_rate": 0.5}


def default_input(card: Card) -> str:
    """Where the metadata is expected: the hub repo, or a local folder named after the card."""
    if card.metadata.hf_repo:
        return f"hf://datasets/{card.metadata.hf_repo}"
    return f"data/{card.name}/"


def download_settings(card: Card) -> dict[str, Any]:
    if documents(card):
        return {"media": "document", **IMAGE_DOWNLOAD}
    if card.modality == "video-text":
        return dict(YOUTUBE_DOWNLOAD if card.metadata.media == "youtube" else VIDEO_DOWNLOAD)
    return dict(IMAGE_DOWNLOAD)


def job_spec(card: Card, files: Optional[list[str]] = None, out_dir: Optional[str] = None) -> dict[str, Any]:
    """A job spec (plain dict, as in YAML) that reads ``card`` through its catalog reader."""
    video = card.modality == "video-text"
    several = video or documents(card)  # a sample holds clips or several images: smaller shards
    spec = {
        "name": card.name,
        "input": {"catalog": card.name, "files": list(files) if files else [default_input(card)]},
        "download": download_settings(card),
        "filters": [],
        "output": {"dir": out_dir or f"out/{card.name}", "samples_per_shard": 1000 if several else 10000},
        "execution": {"engine": "ray"},
    }
    if video and card.metadata.media == "youtube":
        spec["video"] = dict(YOUTUBE_VIDEO)
    if documents(card):
        spec["documents"] = dict(DOCUMENTS)
    return spec


def documents(card: Card) -> bool:
    """Whether the card's reader gives one interleaved document per row."""
    return card.reader is not None and card.reader.layout == "document"


def job_file(card: Card) -> Optional[Path]:
    path = JOBS_DIR / f"{card.name}.yaml"
    return path if path.is_file() else None


def recommended_job(card: Card) -> tuple[Optional[str], str]:
    """The bundled job to start from (``jobs/NAME.yaml``, or None) and why that one."""
    if card.status.state == "withdrawn" and card.status.successor:
        from . import load_card  # the package imports this module's users, not the other way round

        successor = load_card(card.status.successor)
        target = job_file(successor)
        own = f"; jobs/{job_file(card).name} reads a copy you already hold" if job_file(card) else ""
        return (f"jobs/{target.name}" if target else None,
                f"withdrawn: start from its successor {successor.name}{own}")
    if card.reader is None:
        return None, "no reader: convert the metadata to rows, then write input.url_col / input.caption_col"
    bundled = job_file(card)
    if bundled is None:
        return None, "no bundled job yet: `mmcurate catalog spec` writes one"
    note = "withdrawn: only for a copy you already hold" if card.status.state == "withdrawn" else \
        f"download settings for {card.metadata.media} media"
    return f"jobs/{bundled.name}", note


def run_line(card: Card) -> str:
    """One shell line that runs the card: the bundled job spec if there is one, else a generated one."""
    if card.reader is None:
        return (f"# {card.name} has no confirmed column map: convert its metadata to parquet/csv/jsonl, then\n"
                f"mmcurate run JOB.yaml   # with input.files, input.url_col and input.caption_col set")
    bundled = job_file(card)
    if bundled is not None:
        return f"mmcurate run jobs/{bundled.name}"
    return f"mmcurate catalog spec {card.name} --files {default_input(card)} > {card.name}.yaml && " \
           f"mmcurate run {card.name}.yaml"

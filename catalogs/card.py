"""The card schema: one dataclass tree, read from YAML through :func:`pipeline.core.config.from_dict`.

A card records what a dataset *is* (size, licence, status, papers) and how to *read* its published
metadata (where it lives, file layout, which source column means what). Every fact names the
source it was taken from; a fact that could not be confirmed is left empty and listed under
``unconfirmed``, so an empty field always means "not confirmed", never "forgotten".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import date
from typing import Any, Literal, Optional

from pipeline.core.config import ConfigError, from_dict

from .rowpath import compile_path

Modality = Literal["image-text", "video-text", "interleaved"]
State = Literal["available", "gated", "withdrawn"]
Media = Literal["urls", "youtube", "hosted"]
FileFormat = Literal["parquet", "csv", "tsv", "jsonl", "txt", "json", "tar", "other"]
Layout = Literal["table", "explode", "document"]
DocumentOrder = Literal["positions", "matched"]

# Normalised column names a reader may emit, with what they mean. Published scores keep the
# dataset's scale; the card says which model produced them in ``reader.notes``.
COLUMNS: dict[str, str] = {
    "url": "media URL (a YouTube id becomes a watch URL through reader.url_template); "
           "in the document layout, the document's page URL",
    "caption": "text paired with the sample",
    "clip_start": "clip start in seconds",
    "clip_end": "clip end in seconds",
    "clip_span": "a [start, end] pair in the source; emitted as clip_start / clip_end",
    "duration": "media duration in seconds as published",
    "doc_id": "id (or URL) of the interleaved document the image belongs to",
    "position": "position of the image inside its document",
    "sample_id": "the dataset's own id for the sample",
    "video_id": "id of the source video",
    "clip_id": "the dataset's id for the clip",
    "source_width": "image width recorded by the dataset authors",
    "source_height": "image height recorded by the dataset authors",
    "source_sha256": "SHA-256 of the media as collected by the dataset authors",
    "language": "language tag as published",
    "license": "per-sample licence or rights statement as published",
    "clip_similarity": "published CLIP image-text cosine similarity (ViT-B/32 unless noted)",
    "clip_l14_similarity": "published CLIP ViT-L/14 image-text cosine similarity",
    "nsfw": "published NSFW score or tag",
    "watermark": "published watermark probability",
    "aesthetic": "published aesthetic score",
    "match_score": "published video-caption matching score (model named in the card)",
}
TIME_COLUMNS = ("clip_start", "clip_end", "duration")

# Facts every card must either state (with a source) or list under ``unconfirmed``.
REQUIRED_FACTS = ("size.samples", "year", "paper", "homepage", "license.name", "license.commercial_use",
                  "status", "metadata.location", "metadata.format", "reader")
# Facts a card may leave out, but that need a source when stated.
OPTIONAL_FACTS = ("license.research_only", "download.disk_256px_gb", "download.success_rate")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")
_ARXIV_RE = re.compile(r"^\d{4}\.\d{4,5}$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}(-\d{2})?$")
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Size:
    samples: Optional[int] = None          # as published, in ``unit``
    unit: str = "image-text pairs"          # what one sample is
    hours: Optional[float] = None           # total video hours, where published
    videos: Optional[int] = None            # source videos, where published
    images: Optional[int] = None            # images, for interleaved corpora
    documents: Optional[int] = None         # documents, for interleaved corpora
    tokens: Optional[int] = None            # text tokens, where published
    note: str = ""

    def validate(self) -> None:
        for f in ("samples", "videos", "images", "documents", "tokens"):
            v = getattr(self, f)
            if v is not None and v <= 0:
                raise ConfigError(f"{f}: must be > 0, got {v}")
        if self.hours is not None and self.hours <= 0:
            raise ConfigError(f"hours: must be > 0, got {self.hours}")


@dataclass
class Paper:
    arxiv: Optional[str] = None             # e.g. "2111.02114"
    title: Optional[str] = None
    venue: Optional[str] = None
    url: Optional[str] = None               # where the paper is not on arXiv

    def validate(self) -> None:
        if self.arxiv is not None and not _ARXIV_RE.match(self.arxiv):
            raise ConfigError(f"arxiv: expected an id like 2111.02114, got {self.arxiv!r}")

    def link(self) -> Optional[str]:
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else self.url


@dataclass
class License:
    name: Optional[str] = None              # SPDX id where one exists, else a short name
    commercial_use: Optional[bool] = None   # does the licence of the published metadata allow it
    url: Optional[str] = None
    note: str = ""                          # media rights, research-only requests, ...
    # The publisher asks for research use only (a term, a request, or hosted media under research-only
    # terms), even where the licence of the metadata itself would allow more.
    research_only: bool = False


@dataclass
class DownloadFacts:
    """What a download of the dataset gave someone who measured it (numbers from a named source)."""
    disk_256px_gb: Optional[float] = None   # output size with images resized to 256 px, in GB
    success_rate: Optional[float] = None    # share of the URLs that downloaded, 0..1
    note: str = ""                          # when and how it was measured

    def validate(self) -> None:
        if self.disk_256px_gb is not None and self.disk_256px_gb <= 0:
            raise ConfigError(f"disk_256px_gb: must be > 0, got {self.disk_256px_gb}")
        if self.success_rate is not None and not 0 < self.success_rate <= 1:
            raise ConfigError(f"success_rate: expected a share in (0, 1], got {self.success_rate}")


@dataclass
class Status:
    state: Optional[State] = None           # null: not confirmed
    date: Optional[str] = None              # YYYY-MM or YYYY-MM-DD: when the state began
    note: str = ""
    successor: Optional[str] = None         # card to use instead (withdrawn datasets)

    def validate(self) -> None:
        if self.date is not None and not _DATE_RE.match(self.date):
            raise ConfigError(f"date: expected YYYY-MM or YYYY-MM-DD, got {self.date!r}")
        if self.state is None and self.date is not None:
            raise ConfigError("date: a status date needs a state")
        if self.state == "withdrawn" and not self.note:
            raise ConfigError("note: a withdrawn dataset needs a note saying why and what to use instead")


@dataclass
class Metadata:
    hf_repo: Optional[str] = None           # Hugging Face dataset repo id, e.g. "laion/relaion2B-en-research-safe"
    files: list[str] = field(default_factory=list)   # file patterns (inside the repo, or the published names)
    urls: list[str] = field(default_factory=list)    # direct downloads or the download page
    format: Optional[FileFormat] = None
    compression: Optional[Literal["gzip", "zip"]] = None   # how the published files are packed
    header: bool = True                      # delimited files: first line names the columns
    names: list[str] = field(default_factory=list)   # column names for headerless files
    media: Media = "urls"                    # urls: fetch from the web; youtube: video ids; hosted: provider serves files
    access: str = ""                         # how to obtain the metadata (terms, forms, gating)

    def validate(self) -> None:
        if self.hf_repo is not None and not _REPO_RE.match(self.hf_repo):
            raise ConfigError(f"hf_repo: expected ORG/NAME, got {self.hf_repo!r}")
        if not self.header and self.format in ("csv", "tsv") and not self.names:
            raise ConfigError("names: a headerless delimited file needs its column names")

    def location(self) -> Optional[str]:
        if self.hf_repo:
            return f"hf://datasets/{self.hf_repo}" + (f" ({', '.join(self.files)})" if self.files else "")
        return self.urls[0] if self.urls else None


# Fields of an image segment a card may not map: the contract's, the download's and the matched order's.
RESERVED_SEGMENT_FIELDS = ("type", "text", "text_index", "status", "error_kind", "error_message", "width", "height",
                           "original_width", "original_height", "sha256", "member", "source_index")


@dataclass
class DocumentReader:
    """How one source row becomes one interleaved document (``reader.layout: document``).

    ``order: positions`` (OBELICS, OmniCorpus): ``texts`` and ``images`` are parallel lists with one
    non-null entry per position, read in list order. ``order: matched`` (MMC4): ``texts`` is the
    sentence list and each entry of ``images`` names its sentence through ``match``; an image is
    placed right before its sentence (images of one sentence keep their order) and its segment's
    ``text_index`` points at that sentence. ``image`` maps segment fields to source paths in which
    ``@index`` is the image's index in ``images`` (it must map ``url``); ``columns`` are the
    document row's own columns (``url`` is the page); ``keep`` lists source columns copied, as read
    (parsed), into the document dict as its metadata.
    """
    texts: str
    images: str
    image: dict[str, str]
    order: DocumentOrder = "positions"
    match: Optional[str] = None
    columns: dict[str, str] = field(default_factory=dict)
    keep: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if "url" not in self.image:
            raise ConfigError("image: a document reader must map the image segment's 'url'")
        reserved = sorted(set(self.image) & set(RESERVED_SEGMENT_FIELDS))
        if reserved:
            raise ConfigError(f"image: {reserved} are set by the pipeline, not by a reader")
        unknown = sorted(set(self.columns) - set(COLUMNS))
        if unknown:
            raise ConfigError(f"columns: unknown normalised name(s) {unknown}; known: {', '.join(COLUMNS)}")
        if self.order == "matched" and not self.match:
            raise ConfigError("match: order 'matched' needs the path of each image's sentence index")
        if self.order == "positions" and self.match:
            raise ConfigError(f"match: only order 'matched' places images by sentence, got order {self.order!r}")
        paths = [("texts", self.texts), ("images", self.images), *((f"image.{k}", p) for k, p in self.image.items()),
                 *((f"columns.{k}", p) for k, p in self.columns.items()),
                 *((f"keep[{i}]", p) for i, p in enumerate(self.keep)), *([("match", self.match)] if self.match else [])]
        for name, path in paths:
            try:
                compile_path(path)
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None


@dataclass
class Reader:
    """How rows of the published files become samples.

    ``columns`` maps a normalised name (see :data:`COLUMNS`) to a source *path*: ``col``,
    ``col.key`` (into a mapping), ``col[other.path]`` (index a list by another value) or ``@index``
    (the element's position in the exploded list). ``layout: explode`` turns one source row into one
    sample per element of the ``explode`` lists, taken in parallel. ``layout: document`` reads one
    document per row through ``document`` (:class:`DocumentReader`); such a card may keep an
    ``explode`` pair layout (``columns`` + ``explode``) for jobs that want image-text pairs.
    """
    columns: dict[str, str] = field(default_factory=dict)  # the pair layout (empty: documents only)
    layout: Layout = "table"
    explode: list[str] = field(default_factory=list)   # list columns exploded in parallel
    parse: list[str] = field(default_factory=list)     # string columns holding JSON / Python literals
    skip_null: Optional[str] = None          # explode: drop elements whose path is null (text slots)
    url_template: Optional[str] = None       # e.g. "https://www.youtube.com/watch?v={}" for bare ids
    # Optional[DocumentReader]; typed Any for the same reason as Card.reader (errors keep their path)
    document: Any = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.document is not None and not isinstance(self.document, DocumentReader):
            self.document = from_dict(DocumentReader, self.document, "reader.document")

    @property
    def pair_layout(self) -> Optional[str]:
        """The layout that gives one image-text sample per row: the card's own, or (a document
        card) ``explode`` when it has lists to explode; None when it has none."""
        if self.layout != "document":
            return self.layout
        return "explode" if self.explode else None

    def validate(self) -> None:
        unknown = sorted(set(self.columns) - set(COLUMNS))
        if unknown:
            raise ConfigError(f"columns: unknown normalised name(s) {unknown}; known: {', '.join(COLUMNS)}")
        if self.layout == "document" and self.document is None:
            raise ConfigError("document: layout 'document' needs a document section (texts, images, image)")
        if self.document is not None and self.layout != "document":
            raise ConfigError(f"layout: a document section is read with layout 'document', got {self.layout!r}")
        if "url" not in self.columns and self.pair_layout is not None:
            raise ConfigError("columns: a reader must map 'url'")
        if "clip_span" in self.columns and ({"clip_start", "clip_end"} & set(self.columns)):
            raise ConfigError("columns: use clip_span or clip_start/clip_end, not both")
        for name, path in [*self.columns.items(), *((f"explode[{i}]", p) for i, p in enumerate(self.explode)),
                           *([("skip_null", self.skip_null)] if self.skip_null else [])]:
            try:
                compile_path(path)
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
        if self.layout == "explode" and not self.explode:
            raise ConfigError("explode: layout 'explode' needs the list columns to explode")
        if self.layout == "table" and (self.explode or self.skip_null):
            raise ConfigError("explode: only layout 'explode' explodes lists")
        if "@index" in self.columns.values() and self.pair_layout != "explode":
            raise ConfigError("columns: @index only exists with layout 'explode'")
        if self.url_template is not None and "{}" not in self.url_template:
            raise ConfigError(f"url_template: needs a {{}} placeholder, got {self.url_template!r}")


@dataclass
class Source:
    url: str
    facts: list[str]                         # fact paths this source supports, e.g. [size.samples, license]
    title: str = ""


@dataclass
class Card:
    name: str
    title: str
    modality: Modality
    description: str
    license: License
    metadata: Metadata
    sources: list[Source]
    verified: Any = None                    # YYYY-MM-DD: when the facts were last checked against the sources
    status: Status = field(default_factory=Status)
    size: Size = field(default_factory=Size)
    download: DownloadFacts = field(default_factory=DownloadFacts)
    year: Optional[int] = None
    paper: Paper = field(default_factory=Paper)
    homepage: Optional[str] = None
    # Optional[Reader]; typed Any so that from_dict hands over the mapping and __post_init__ converts it
    # (errors inside an Optional[dataclass] would otherwise be reported only as "expected a mapping or null").
    reader: Any = None
    aliases: list[str] = field(default_factory=list)
    related: list[str] = field(default_factory=list)    # other cards: subsets, successors, sources
    unconfirmed: list[str] = field(default_factory=list)  # fact paths left empty on purpose
    notes: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.verified, date):  # YAML reads an unquoted 2026-12-02 as a date
            self.verified = self.verified.isoformat()
        if self.reader is not None and not isinstance(self.reader, Reader):
            self.reader = from_dict(Reader, self.reader, "reader")

    def validate(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"name: expected lowercase letters, digits and dashes, got {self.name!r}")
        if self.year is not None and not 1990 <= self.year <= 2100:
            raise ConfigError(f"year: out of range: {self.year}")
        if self.verified is None:
            raise ConfigError("verified: missing; the date (YYYY-MM-DD) the facts were last checked against the sources")
        if not isinstance(self.verified, str) or not _DAY_RE.match(self.verified):
            raise ConfigError(f"verified: expected YYYY-MM-DD, got {self.verified!r}")
        if not self.size.unit.strip():
            raise ConfigError("size.unit: must say what one sample is (pairs, images, documents, clips, ...)")
        if not self.sources:
            raise ConfigError("sources: every card needs at least one source")
        for i, src in enumerate(self.sources):
            for fact in src.facts:
                if not _known_fact(fact):
                    raise ConfigError(f"sources[{i}].facts: unknown fact {fact!r}")
        for fact in self.unconfirmed:
            if not _known_fact(fact):
                raise ConfigError(f"unconfirmed: unknown fact {fact!r}")
            if fact_value(self, fact) not in (None, [], {}, ""):
                raise ConfigError(f"unconfirmed: {fact!r} is listed as unconfirmed but has a value; "
                                  "leave it empty or remove it from the list")
        for fact in REQUIRED_FACTS:
            empty = fact_value(self, fact) in (None, [], {}, "")
            if empty and fact not in self.unconfirmed:
                raise ConfigError(f"{fact}: missing; state it with a source or list it under unconfirmed")
            if not empty and not self.sources_for(fact):
                raise ConfigError(f"{fact}: no entry in sources supports this fact")
        for fact in OPTIONAL_FACTS:
            if fact_value(self, fact) not in (None, False) and not self.sources_for(fact):
                raise ConfigError(f"{fact}: set to {fact_value(self, fact)!r} but no entry in sources supports it")

    # -- helpers used by the CLI and the HTML page -------------------------------------------------
    def sources_for(self, fact: str) -> list[Source]:
        """Sources whose ``facts`` name this fact, one of its parents or one of its children."""
        return [s for s in self.sources
                if any(fact == f or fact.startswith(f + ".") or f.startswith(fact + ".") for f in s.facts)]

    def commercial(self) -> tuple[str, str]:
        """May a person use it commercially: ``(yes | no | unconfirmed, why)``.

        Not just the licence tag: a withdrawn dataset is not to be used, and a research-only request
        (or research-only hosted media) rules commercial use out even under a permissive licence.
        """
        licence = self.license.commercial_use
        if self.status.state == "withdrawn":
            return "no", "withdrawn by its publisher"
        if licence is False:
            return "no", "the licence does not allow it"
        if self.license.research_only:
            return "no", "the publisher asks for research use only"
        if licence is None:
            return "unconfirmed", "the licence was not confirmed"
        return "yes", "the licence allows it; media rights are separate"

    @property
    def commercial_label(self) -> str:
        return self.commercial()[0]

    def keys(self) -> list[str]:
        """Lookup keys: the name and aliases, normalised."""
        return [normalise(self.name)] + [normalise(a) for a in self.aliases]


def normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def fact_value(card: Card, fact: str) -> Any:
    """The value behind a fact path; composite facts are empty when all their parts are."""
    if fact == "paper":
        return card.paper.arxiv or card.paper.url
    if fact == "metadata.location":
        return card.metadata.location()
    if fact == "status":
        return card.status.state
    node: Any = card
    for part in fact.split("."):
        if node is None:
            return None
        node = node.get(part) if isinstance(node, dict) else getattr(node, part)
    return node


def _known_fact(fact: str) -> bool:
    if fact in ("paper", "status", "metadata.location", "reader"):
        return True
    parts = fact.split(".")
    cls: Any = Card
    for i, part in enumerate(parts):
        if not is_dataclass(cls):
            return False
        match = {f.name: f for f in fields(cls)}.get(part)
        if match is None:
            return False
        if part == "columns" and cls is Reader:
            return i == len(parts) - 1 or (i == len(parts) - 2 and parts[-1] in COLUMNS)
        cls = _FIELD_TYPES.get((cls.__name__, part))
    return True


_FIELD_TYPES = {("Card", "size"): Size, ("Card", "paper"): Paper, ("Card", "license"): License,
                ("Card", "download"): DownloadFacts,
                ("Card", "status"): Status, ("Card", "metadata"): Metadata, ("Card", "reader"): Reader,
                ("Reader", "document"): DocumentReader}

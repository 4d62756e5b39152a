"""Training sequences for unified autoregressive models: the text and image stages' ids composed
into one sequence in the target model's vocabulary (``KEY.sequence.npy``), with its modality
spans (``KEY.spans.npy``), so that trainers pack and mask without decoding anything.

A sample is a list of **segments**: text ids (1-D) or an image grid of visual codes (2-D, rows by
columns). :func:`compose` is a pure function of the segments and a :class:`VocabularyMapping`
(documents reuse it with more segments); :func:`decompose` is its inverse. An image becomes

    boi  [prefix]  row 0 codes [eol]  row 1 codes [eol] ...  [suffix]  eoi

in the mapping's ids:

* ``emu3`` (BAAI Emu3, as transformers' ``Emu3Processor`` and ``Emu3ImageVocabularyMapping`` and
  Emu3's own ``format_image_prompt``): ``<|image start|>``, the size "H*W" as text ids,
  ``<|image token|>``, each row of ``<|visual token NNNNNN|>`` followed by ``<|extra_200|>`` (EOL),
  ``<|extra_201|>`` (EOF), ``<|image end|>``; bos ``<|extra_203|>`` / eos ``<|extra_204|>``.
* ``chameleon`` (transformers' ``ChameleonImageVocabularyMapping``): code i is the token
  ``IMGIMG<i with digits A..J>Z`` (any closing letter is read, as transformers does), between
  ``<racm3:break>`` and ``<eoss>``; no EOL (its grid is fixed, and the ``image_grid`` column gives
  the shape; on documents, the image segment's ``image_grid`` field).
* ``offset``: code i is ``visual_offset + i``; ``boi``, ``eoi`` and the optional ``eol``,
  ``bos``, ``eos`` are ids from the config.

Spans are rows ``(start, end, modality)``, end exclusive, that tile the sequence: modality 0 text,
1 image (its markers, prefix and EOLs included), 2 the bos/eos tokens. The sequence is stored as
uint16 when the vocabulary has at most 65536 ids, else uint32; spans as int32.

**Documents** (rows with a ``document``, ``pipeline.core.document``): one sequence per document,
in reading order: bos, then each text segment's ids (member ``text_NNN.text_ids.npy``, written by
the text stage over the text view) and each *kept* image's grid (``image_NNN.image_ids.npy``, the
image stage over the image view), then eos; ``order`` does not apply. A kept image is one whose
status is success (or pending); a dead, undecodable or filtered image is left out, markers and all.
Which slot a span is, without decoding: the n-th image span is the n-th kept image slot (the slots
whose status in ``KEY.json`` is success, ascending: ``document.live_images``), the n-th text span the n-th text slot with at
least one id (an empty text has no span). A kept image without ids, or a slot whose ids do not fit
the mapping, fails the document (``stage_error``, the message names the slot).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from pipeline.core import document as doc
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.schema import Batch, ErrorKind
from pipeline.core.stage import Stage
from pipeline.media.npy import npy_bytes, read_npy

from .common import FORMAT_VERSION, with_id
from .config import SequenceTokenizeConfig, TextTokenizeConfig

TEXT, IMAGE, SPECIAL = 0, 1, 2  # the modality column of KEY.spans.npy
TEXT_IDS, IMAGE_IDS = "text_ids.npy", "image_ids.npy"
SEQUENCE, SPANS = "sequence.npy", "spans.npy"

EMU3_VISUAL = re.compile(r"<\|visual token (\d{6})\|>")
EMU3_TOKENS = {"boi": "<|image start|>", "eoi": "<|image end|>", "image_wrapper": "<|image token|>",
               "eof": "<|extra_201|>", "eol": "<|extra_200|>"}
CHAMELEON_VISUAL = re.compile(r"IMGIMG([A-J]+).")  # digits as letters, then one closing letter
CHAMELEON_TOKENS = {"boi": "<racm3:break>", "eoi": "<eoss>"}


class SequenceError(ValueError):
    """A sample's ids cannot be composed in the mapping (an id out of range, a clip's grid)."""


def sequence_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (at most 65536 ids), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class VocabularyMapping:
    """How segments become ids of one vocabulary (see the module docstring)."""

    name: str
    vocab_size: int
    visual: np.ndarray                     # visual code -> token id
    boi: int
    eoi: int
    eol: Optional[int] = None
    bos: Optional[int] = None
    eos: Optional[int] = None
    prefix: Callable[[int, int], list[int]] = lambda h, w: []  # ids between boi and the grid
    suffix: tuple[int, ...] = ()           # ids between the grid and eoi
    _code_of: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def code_of(self) -> np.ndarray:
        """token id -> visual code, -1 for ids that are not visual."""
        if self._code_of is None:
            self._code_of = np.full(self.vocab_size, -1, np.int64)
            self._code_of[self.visual] = np.arange(len(self.visual))
        return self._code_of

    def describe(self) -> dict:
        """What determines the ids, for the fingerprint."""
        return {"mapping": self.name, "vocab_size": self.vocab_size, "visual_tokens": len(self.visual),
                "visual_first": int(self.visual[0]), "visual_contiguous": bool(np.all(np.diff(self.visual) == 1)),
                "boi": self.boi, "eoi": self.eoi, "eol": self.eol, "bos": self.bos, "eos": self.eos,
                "suffix": list(self.suffix), "prefix_2x3": self.prefix(2, 3)}

    def image_ids(self, grid: np.ndarray) -> np.ndarray:
        h, w = grid.shape
        if grid.size and (grid.min() < 0 or grid.max() >= len(self.visual)):
            bad = int(grid.max() if grid.max() >= len(self.visual) else grid.min())
            raise SequenceError(f"visual id {bad} is outside the {self.name} mapping's "
                                f"{len(self.visual)} visual tokens")
        rows = self.visual[grid.astype(np.int64)]
        if self.eol is not None:
            rows = np.concatenate([rows, np.full((h, 1), self.eol, np.int64)], axis=1)
        return np.concatenate([[self.boi], self.prefix(h, w), rows.ravel(), self.suffix, [self.eoi]]).astype(np.int64)

    def image_grid(self, ids: np.ndarray) -> np.ndarray:
        """The visual codes of one image span (2-D with an EOL, else 1-D); raises SequenceError."""
        if len(ids) < 2 or ids[0] != self.boi or ids[-1] != self.eoi:
            raise SequenceError("an image span must start with boi and end with eoi")
        body = ids[1:len(ids) - 1 - len(self.suffix)]
        codes = self.code_of[body]
        start = int(np.argmax(codes >= 0)) if (codes >= 0).any() else len(body)
        body, codes = body[start:], codes[start:]  # past the prefix (Emu3: "H*W<|image token|>")
        if self.eol is not None:
            width = int(np.argmax(body == self.eol)) if (body == self.eol).any() else -1
            if width < 0 or len(body) % (width + 1):
                raise SequenceError("image span rows are not each ended by eol")
            grid = codes.reshape(-1, width + 1)
            if (body.reshape(grid.shape)[:, -1] != self.eol).any() or (grid[:, :-1] < 0).any():
                raise SequenceError("image span rows are not each ended by eol")
            return grid[:, :-1]
        if (codes < 0).any():
            raise SequenceError("an image span holds a non-visual id")
        return codes


def compose(segments: Sequence[np.ndarray], mapping: VocabularyMapping,
            names: Optional[Sequence[str]] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, spans)`` of a sample: bos, each segment in order (1-D text ids, 2-D image grid), eos.
    Empty text segments are left out. Raises SequenceError, its message led by the segment's name
    in ``names`` when given ("image slot 2: ...")."""
    parts: list[np.ndarray] = []
    spans: list[tuple[int, int, int]] = []

    def add(ids: np.ndarray, modality: int) -> None:
        start = spans[-1][1] if spans else 0
        parts.append(ids)
        spans.append((start, start + len(ids), modality))

    if mapping.bos is not None:
        add(np.array([mapping.bos], np.int64), SPECIAL)
    for n, segment in enumerate(segments):
        try:
            made = _segment_ids(np.asarray(segment), mapping)
        except SequenceError as e:
            raise SequenceError(f"{names[n]}: {e}" if names is not None else str(e)) from None
        if made is not None:
            add(*made)
    if mapping.eos is not None:
        add(np.array([mapping.eos], np.int64), SPECIAL)
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return ids, np.array(spans, np.int32).reshape(-1, 3)


def _segment_ids(segment: np.ndarray, mapping: VocabularyMapping) -> Optional[tuple[np.ndarray, int]]:
    """One segment's ids and modality; None for empty text."""
    if segment.ndim == 1:
        if not len(segment):
            return None
        if segment.min() < 0 or segment.max() >= mapping.vocab_size:
            bad = int(segment.max() if segment.max() >= mapping.vocab_size else segment.min())
            raise SequenceError(f"text id {bad} is outside the vocabulary ({mapping.vocab_size} ids)")
        return segment.astype(np.int64), TEXT
    if segment.ndim == 2:
        return mapping.image_ids(segment), IMAGE
    raise SequenceError(f"a segment is text ids (1-D) or an image grid (2-D), got shape {segment.shape} "
                        "(clips are not composed)")


def document_segments(document: dict, files: Mapping[str, bytes]) -> tuple[list[np.ndarray], list[str]]:
    """A document's segments in reading order, with their names ("text slot 0", "image slot 2"):
    every text segment's ids and every kept image's grid (see the module docstring)."""
    kept = set(doc.live_images(document))
    segments: list[np.ndarray] = []
    names: list[str] = []
    text = image = 0
    for seg in doc.segments(document):
        if seg.get("type") == doc.TEXT:
            name, member, stage, use = f"text slot {text}", doc.text_member(text, TEXT_IDS), "text", True
            text += 1
        elif seg.get("type") == doc.IMAGE:
            name, member, stage = f"image slot {image}", doc.image_member(image, IMAGE_IDS), "image"
            use = image in kept
            image += 1
        else:
            continue
        if not use:
            continue
        if member not in files:
            raise SequenceError(f"{name} has no {member} (the {stage} stage runs first, on each "
                                f"{'kept image' if stage == 'image' else 'text segment'})")
        try:
            segments.append(read_npy(files[member]))
        except ValueError as e:
            raise SequenceError(f"{name}: {member} is not a valid .npy: {e}") from None
        names.append(name)
    return segments, names


def decompose(ids: np.ndarray, spans: np.ndarray, mapping: VocabularyMapping) -> list[tuple[int, np.ndarray]]:
    """The inverse of :func:`compose`: ``(modality, ids or codes)`` of each text and image span."""
    ids = np.asarray(ids, np.int64)
    out = []
    for start, end, modality in np.asarray(spans).tolist():
        if modality == TEXT:
            out.append((TEXT, ids[start:end]))
        elif modality == IMAGE:
            out.append((IMAGE, mapping.image_grid(ids[start:end])))
    return out


# -- the mappings ----------------------------------------------------------------------------------

def _token_id(vocab: dict[str, int], name: str, mapping: str, source: str) -> int:
    if name not in vocab:
        raise ConfigError(f"tokenizer: {source!r} has no {name!r} token (not a {mapping} tokenizer?)")
    return vocab[name]


def _visual_table(codes: dict[int, int], mapping: str, source: str) -> np.ndarray:
    if not codes or sorted(codes) != list(range(len(codes))):
        raise ConfigError(f"tokenizer: {source!r} has no contiguous {mapping} visual tokens from code 0 "
                          f"({len(codes)} found)")
    return np.array([codes[i] for i in range(len(codes))], np.int64)


def emu3_mapping(tokenizer, config: SequenceTokenizeConfig) -> VocabularyMapping:
    vocab, source = tokenizer.get_vocab(), config.tokenizer
    names = {k: getattr(tokenizer, f"{k}_token", None) or v for k, v in EMU3_TOKENS.items()}
    ids = {k: _token_id(vocab, n, "Emu3", source) for k, n in names.items()}
    codes = {int(m.group(1)): i for name, i in vocab.items() if (m := EMU3_VISUAL.fullmatch(name))}
    size_ids: dict[tuple[int, int], list[int]] = {}

    def prefix(h: int, w: int) -> list[int]:  # "H*W" as text, then <|image token|>
        if (h, w) not in size_ids:
            size_ids[(h, w)] = list(tokenizer.encode(f"{h}*{w}", add_special_tokens=False)) + [ids["image_wrapper"]]
        return size_ids[(h, w)]

    return VocabularyMapping("emu3", _vocab_size(tokenizer, vocab), _visual_table(codes, "Emu3", source),
                             ids["boi"], ids["eoi"], ids["eol"], *_bos_eos(tokenizer, config),
                             prefix=prefix, suffix=(ids["eof"],))


def chameleon_mapping(tokenizer, config: SequenceTokenizeConfig) -> VocabularyMapping:
    vocab, source = tokenizer.get_vocab(), config.tokenizer
    names = {k: getattr(tokenizer, f"{k}_token", None) or v for k, v in CHAMELEON_TOKENS.items()}
    ids = {k: _token_id(vocab, n, "Chameleon", source) for k, n in names.items()}
    digits = str.maketrans("ABCDEFGHIJ", "0123456789")
    codes = {int(m.group(1).translate(digits)): i for name, i in vocab.items()
             if (m := CHAMELEON_VISUAL.fullmatch(name))}
    return VocabularyMapping("chameleon", _vocab_size(tokenizer, vocab), _visual_table(codes, "Chameleon", source),
                             ids["boi"], ids["eoi"], None, *_bos_eos(tokenizer, config))


def offset_mapping(config: SequenceTokenizeConfig) -> VocabularyMapping:
    c = config
    visual = np.arange(c.visual_offset, c.visual_offset + c.visual_count, dtype=np.int64)
    return VocabularyMapping("offset", c.vocab_size, visual, c.boi, c.eoi, c.eol, c.bos, c.eos)


def _vocab_size(tokenizer, vocab: dict[str, int]) -> int:
    return max(len(tokenizer), max(vocab.values()) + 1)


def _bos_eos(tokenizer, config: SequenceTokenizeConfig) -> tuple[Optional[int], Optional[int]]:
    bos = tokenizer.bos_token_id if config.add_bos else None
    eos = tokenizer.eos_token_id if config.add_eos else None
    for key, wanted, value in (("add_bos", config.add_bos, bos), ("add_eos", config.add_eos, eos)):
        if wanted and value is None:
            raise ConfigError(f"{key}: the tokenizer {config.tokenizer!r} has no {key[4:]} token")
    return bos, eos


def load_mapping(config: SequenceTokenizeConfig):
    """``(mapping, the model tokenizer or None)``; the tokenizer loads as the text stage's does."""
    if config.mapping == "offset":
        return offset_mapping(config), None
    from .text import TransformersTokenizer

    tokenizer = TransformersTokenizer(config.tokenizer, TextTokenizeConfig(
        tokenizer=config.tokenizer, revision=config.revision, max_length=None, truncation=False,
        add_special_tokens=False))
    build = emu3_mapping if config.mapping == "emu3" else chameleon_mapping
    return build(tokenizer.tokenizer, config), tokenizer


# -- the stage -------------------------------------------------------------------------------------

class SequenceStage(Stage):
    """Per sample: ``KEY.sequence.npy`` and ``KEY.spans.npy`` from ``KEY.text_ids.npy`` and
    ``KEY.image_ids.npy``, in ``order``; a sample whose ids do not fit the mapping is failed."""

    name = "tokenize_sequence"
    worker_state = ("_mapping", "_tokenizer")
    document_view = None  # a document row is composed whole, from its slots' members

    def __init__(self, config: SequenceTokenizeConfig):
        super().__init__(config)
        self._mapping: Optional[VocabularyMapping] = None
        self._tokenizer = None
        self._fingerprint: Optional[dict] = None

    @property
    def columns(self) -> dict[str, str]:
        return {"sequence_tokenizer": "string", "sequence_length": "int32"}

    @property
    def mapping(self) -> VocabularyMapping:
        self.setup()
        return self._mapping

    def check(self) -> None:
        self.setup()

    def check_inputs(self, text_fingerprint: dict, codebook_size: Optional[int], kind: str) -> None:
        """Against the text and image stages (in the driver): the text ids must be in this
        vocabulary, and every visual code must have a token."""
        mapping = self.mapping
        if kind != "vq":
            raise ConfigError("image: the sequence needs discrete visual ids (a VQ tokenizer), not latents")
        if codebook_size is not None and codebook_size > len(mapping.visual):
            raise ConfigError(f"sequence: the image tokenizer has {codebook_size} codes but the {mapping.name} "
                              f"mapping has {len(mapping.visual)} visual tokens")
        if self._tokenizer is not None:
            if text_fingerprint.get("vocab_sha256") != self._tokenizer.vocab_sha256():
                raise ConfigError(f"sequence.tokenizer: {self.config.tokenizer!r} is not the text stage's tokenizer "
                                  f"({text_fingerprint.get('source')!r}): the text ids would be in another vocabulary")
        elif text_fingerprint["vocab_size"] > mapping.visual[0]:
            raise ConfigError(f"sequence.visual_offset: {int(mapping.visual[0])} overlaps the text tokenizer's ids "
                              f"(its vocabulary has {text_fingerprint['vocab_size']})")

    def setup(self) -> None:
        if self._mapping is None:
            self._mapping, self._tokenizer = load_mapping(self.config)
            self._dtype = sequence_dtype(self._mapping.vocab_size)

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            c, m = self.config, self.mapping
            self._fingerprint = with_id({
                "stage": self.name, "format_version": FORMAT_VERSION, **m.describe(), "order": c.order,
                "ids_dtype": self._dtype.name, "spans": "start,end,modality(0 text,1 image,2 special)",
                "source": c.tokenizer, "revision": c.revision,
                "vocab_sha256": self._tokenizer.vocab_sha256() if self._tokenizer is not None else None,
            })
        return self._fingerprint

    def segments(self, files: dict[str, bytes]) -> list[np.ndarray]:
        """A pair's segments in the configured order (documents: :func:`document_segments`)."""
        missing = [m for m in (TEXT_IDS, IMAGE_IDS) if m not in files]
        if missing:
            raise SequenceError(f"no {missing[0]} (the text and image stages run first)")
        text, image = read_npy(files[TEXT_IDS]), read_npy(files[IMAGE_IDS])
        return [text, image] if self.config.order == "text_first" else [image, text]

    def process(self, batch: Batch) -> Batch:
        self.setup()
        fp_id = self.fingerprint()["id"]
        done, lengths = [], []
        documents = batch.get(schema.DOCUMENT)
        for i in schema.alive(batch):
            files = batch[schema.FILES][i]
            document = documents[i] if documents is not None else None
            try:
                if isinstance(document, dict):
                    segments, names = document_segments(document, files)
                    ids, spans = compose(segments, self._mapping, names)
                else:
                    ids, spans = compose(self.segments(files), self._mapping)
            except ValueError as e:  # SequenceError, or a member that is not a valid .npy
                schema.mark(batch, i, ErrorKind.STAGE_ERROR, f"{self.name}: {e}")
                continue
            files[SEQUENCE] = npy_bytes(ids.astype(self._dtype))
            files[SPANS] = npy_bytes(spans)
            done.append(i)
            lengths.append(len(ids))
        schema.set_column(batch, "sequence_tokenizer", done, [fp_id] * len(done))
        schema.set_column(batch, "sequence_length", done, lengths)
        return batch

"""The text tokenizer stage: captions to token ids (``KEY.text_ids.npy``).

Backends: open_clip's bundled BPE (offline), a ``tokenizers`` tokenizer.json file, or any
transformers tokenizer from a local directory or the hub. Ids are stored without padding, uint16
when the vocabulary fits, else int32; for open_clip that is its own output up to and including the
end-of-text token (its zero padding is dropped: 0 is also a real token, "!").

The stage is stateless (runs in the CPU tasks next to the download): a tokenizer loads in well
under a second once per worker process and needs no GPU, so an actor pool would only add a hop.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.schema import Batch, ErrorKind
from pipeline.core.stage import Stage
from pipeline.media.npy import npy_bytes

from .checkpoint import HUB_ID
from .common import FORMAT_VERSION, ids_dtype, with_id
from .config import OPEN_CLIP, TextTokenizeConfig, is_open_clip


class TextTokenizer:
    """Encodes a list of texts to lists of ids."""

    kind: str

    def encode(self, texts: list[str]) -> list[Sequence[int]]:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def vocab_sha256(self) -> str:
        raise NotImplementedError


class OpenClipTokenizer(TextTokenizer):
    kind = "open_clip.SimpleTokenizer"

    def __init__(self, model_name: str, context_length: int):
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
        if not hasattr(self.tokenizer, "eot_token_id"):
            raise ConfigError(f"tokenizer: open_clip model {model_name!r} uses a hub tokenizer; "
                              "give its hub id or a local copy instead")
        self.context_length = context_length

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.tokenizer(texts, context_length=self.context_length).numpy()
        ends = (ids == self.tokenizer.eot_token_id).argmax(axis=1) + 1  # one end token per row
        return [row[:end] for row, end in zip(ids, ends)]  # views: no Python list of ints

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer.encoder)

    def vocab_sha256(self) -> str:
        merges = sorted(self.tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])
        data = json.dumps([sorted(self.tokenizer.encoder.items()), [list(m) for m, _ in merges]])
        return hashlib.sha256(data.encode()).hexdigest()


class TokenizersFile(TextTokenizer):
    """A ``tokenizers`` tokenizer.json file."""

    kind = "tokenizers.Tokenizer"

    def __init__(self, path: Path, config: TextTokenizeConfig):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        if config.truncation:
            self.tokenizer.enable_truncation(config.max_length)
        else:
            self.tokenizer.no_truncation()
        self.add_special_tokens = config.add_special_tokens

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=self.add_special_tokens)]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def vocab_sha256(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()


class TransformersTokenizer(TextTokenizer):
    """``AutoTokenizer.from_pretrained`` on a local directory or a hub id."""

    kind = "transformers.AutoTokenizer"

    def __init__(self, source: str, config: TextTokenizeConfig):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, revision=config.revision)
        except (OSError, ValueError) as e:
            raise ConfigError(f"tokenizer: cannot load {source!r}: {e}") from None
        self.kwargs = dict(truncation=config.truncation, max_length=config.max_length,
                           add_special_tokens=config.add_special_tokens)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, **self.kwargs)["input_ids"]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def vocab_sha256(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        data = backend.to_str() if backend is not None else json.dumps(sorted(self.tokenizer.get_vocab().items()))
        special = json.dumps(self.tokenizer.special_tokens_map, sort_keys=True, default=str)
        return hashlib.sha256((data + special).encode()).hexdigest()


def load_text_tokenizer(config: TextTokenizeConfig) -> TextTokenizer:
    # Tokenizing in a worker that may fork: choose rayon's threading explicitly (tokenizers #187).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name = config.tokenizer
    if is_open_clip(name):
        return OpenClipTokenizer(name.partition(":")[2] or "ViT-B-32", config.max_length)
    path = Path(name).expanduser()
    if path.is_file():
        return TokenizersFile(path, config)
    if path.is_dir() or HUB_ID.match(name):
        return TransformersTokenizer(name, config)
    raise ConfigError(f"tokenizer: {name!r} is not {OPEN_CLIP}, a tokenizer file or directory, or a hub id")


class TextTokenizeStage(Stage):
    name = "tokenize_text"
    worker_state = ("_tokenizer",)
    document_view = "text"  # on documents: each text segment, its ids in member text_NNN.text_ids.npy

    def __init__(self, config: TextTokenizeConfig):
        super().__init__(config)
        self._tokenizer: Optional[TextTokenizer] = None
        self._fingerprint: Optional[dict] = None

    @property
    def columns(self) -> dict[str, str]:
        return {"text_tokenizer": "string", "text_length": "int32"}

    def check(self) -> None:
        self.setup()  # a tokenizer that does not load should fail here, not in every shard

    def setup(self) -> None:
        if self._tokenizer is None:
            self._tokenizer = load_text_tokenizer(self.config)
            self._dtype = ids_dtype(self._tokenizer.vocab_size)

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self.setup()
            c, tok = self.config, self._tokenizer
            self._fingerprint = with_id({
                "stage": self.name, "format_version": FORMAT_VERSION, "class": tok.kind,
                "source": c.tokenizer, "revision": c.revision, "vocab_sha256": tok.vocab_sha256(),
                "vocab_size": tok.vocab_size, "ids_dtype": self._dtype.name, "max_length": c.max_length,
                "truncation": c.truncation, "add_special_tokens": c.add_special_tokens, "padding": False,
            })
        return self._fingerprint

    def process(self, batch: Batch) -> Batch:
        self.setup()  # no-op once loaded; a stage unpickled in a worker loads here
        fp_id = self.fingerprint()["id"]
        rows = schema.alive(batch)
        texts = [_text(batch[schema.CAPTION][i]) for i in rows]
        try:
            encoded = self._tokenizer.encode(texts)
        except Exception:  # find the culprits one by one; the others are encoded again, identically
            encoded = [self._encode_one(batch, i, t) for i, t in zip(rows, texts)]
        done, lengths = [], []
        for i, ids in zip(rows, encoded):
            if ids is None:
                continue
            batch[schema.FILES][i]["text_ids.npy"] = npy_bytes(np.asarray(ids, dtype=self._dtype))
            done.append(i)
            lengths.append(len(ids))
        schema.set_column(batch, "text_tokenizer", done, [fp_id] * len(done))
        schema.set_column(batch, "text_length", done, lengths)
        return batch

    def _encode_one(self, batch: Batch, i: int, text: str) -> Optional[list[int]]:
        try:
            return self._tokenizer.encode([text])[0]
        except Exception as e:
            schema.mark(batch, i, ErrorKind.STAGE_ERROR, f"{self.name}: {type(e).__name__}: {e}")
            return None


def _text(caption) -> str:
    return caption if isinstance(caption, str) else ""

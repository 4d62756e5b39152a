"""Tiny Emu3 and Chameleon tokenizer folders in the published layouts (no tests here).

Each is a ``tokenizers`` byte-level BPE trained on a few sentences, saved as ``tokenizer.json``
plus ``tokenizer_config.json``, with the models' real token names: Emu3's
``<|visual token NNNNNN|>``, ``<|image start|>``, ``<|image end|>``, ``<|image token|>``,
``<|extra_200|>`` (EOL), ``<|extra_201|>`` (EOF), bos ``<|extra_203|>``, eos ``<|extra_204|>``
and the ``boi_token`` ... entries of ``BAAI/Emu3-Gen-hf``'s tokenizer config; Chameleon's
``IMGIMG<code as letters A..J>Z``, ``<racm3:break>``, ``<eoss>``, ``<image>``. Also document
batches in the ``pipeline.core.document`` form, as the download stage leaves them.
"""
from __future__ import annotations

import json
from pathlib import Path


CORPUS = ["a photo of a cat on a red sofa", "the quick brown fox jumps over the lazy dog",
          "caption 12 of a dog in 32*32 pixels", "sunset over the sea, with boats"]
EMU3_SPECIAL = ["<|endoftext|>", "<|extra_200|>", "<|extra_201|>", "<|extra_203|>", "<|extra_204|>",
                "<|image start|>", "<|image end|>", "<|image token|>", "<image>"]
EMU3_EXTRA = {"boi_token": "<|image start|>", "eoi_token": "<|image end|>", "image_token": "<image>",
              "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"}
CHAMELEON_SPECIAL = ["<s>", "</s>", "<pad>", "<unk>", "<eoss>", "<racm3:break>", "<image>"]


def chameleon_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def _bpe(special: list[str], extra: list[str], vocab_size: int = 300):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    return tok


def save_emu3_tokenizer(path: Path, visual_tokens: int = 512) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _bpe(EMU3_SPECIAL, [f"<|visual token {i:06d}|>" for i in range(visual_tokens)]).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|extra_203|>", "eos_token": "<|extra_204|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False,
        "processor_class": "Emu3Processor", "extra_special_tokens": EMU3_EXTRA, **EMU3_EXTRA}))
    return path


def save_chameleon_tokenizer(path: Path, visual_tokens: int = 512) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _bpe(CHAMELEON_SPECIAL, [chameleon_name(i) for i in range(visual_tokens)]).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "processor_class": "ChameleonProcessor"}))
    return path

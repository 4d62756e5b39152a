"""Helpers shared by the tokenizer tests (no tests here): batches and tiny random checkpoints
saved with ``save_pretrained``, so every model is loaded by path like a user's."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image

from pipeline.core import schema
from pipeline.job.spec import JobSpec, load_job
from pipeline.testing.assets import TINY_VQ
from pipeline.testing.serve import LocalServer
from pipeline.testing.synthetic import make_pairs

torch.set_num_threads(2)


def make_batch(files: list[dict], captions: list = None) -> dict:
    n = len(files)
    batch = {c: [None] * n for c in schema.STATUS_COLUMNS}
    batch[schema.KEY] = [f"00000{i:04d}" for i in range(n)]
    batch[schema.STATUS] = [schema.SUCCESS] * n
    batch[schema.CAPTION] = list(captions) if captions is not None else [f"caption {i}" for i in range(n)]
    batch[schema.FILES] = [dict(f) for f in files]
    return batch


def encode_image(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def save_tiny_emu3(path: Path, temporal: int = 1, seed: int = 0, codebook: int = 64) -> Path:
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(seed)
    model = Emu3VQVAE(Emu3VQVAEConfig(**emu3_vq_config(temporal, codebook))).eval()
    with torch.no_grad():  # codes drawn from encoder outputs, so that random weights use many ids
        hidden = model.encoder(torch.rand(2, 2 * temporal, 3, 32, 32) * 2 - 1)
        z = model.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 3, 4, 1).reshape(-1, 4)
        model.quantize.embedding.weight.copy_(z[torch.randperm(len(z))[:codebook]])
    model.save_pretrained(path)
    return path


def emu3_vq_config(temporal: int = 1, codebook: int = 64) -> dict:
    return dict(codebook_size=codebook, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1],
                num_res_blocks=1, attn_resolutions=[], hidden_size=32, temporal_downsample_factor=temporal)


def save_tiny_emu3_full(path: Path, seed: int = 0):
    """A whole (tiny) Emu3ForConditionalGeneration: the VQ is one part of the checkpoint."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = Emu3Config(vq_config=emu3_vq_config(), text_config=text,
                        vocabulary_map={f"<|visual token {i:06d}|>": 64 + i for i in range(64)})
    model = Emu3ForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return model


def save_tiny_chameleon(path: Path, seed: int = 0) -> Path:
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    torch.manual_seed(seed)
    config = ChameleonVQVAEConfig(embed_dim=4, num_embeddings=300, latent_channels=4, base_channels=32,
                                  channel_multiplier=[1, 2], num_res_blocks=1, resolution=32, attn_resolutions=[])
    model = ChameleonVQVAE(config).eval()
    with torch.no_grad():  # codes drawn from encoder outputs, so that random weights use many ids
        z = model.quant_conv(model.encoder(torch.rand(4, 3, 32, 32) * 2 - 1))
        z = z.permute(0, 2, 3, 1).reshape(-1, 4)
        model.quantize.embedding.weight.copy_(z[torch.randperm(len(z))[:300]])
    model.save_pretrained(path)
    return path


def save_tiny_vae(path: Path, seed: int = 0, scaling_factor: float = 0.5) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                  latent_channels=4, norm_num_groups=32, sample_size=32,
                  scaling_factor=scaling_factor).save_pretrained(path)
    return path


# -- tokenize jobs over a local server ---------------------------------------------------------------
TOKENIZE = {"text": {"tokenizer": "open_clip", "max_length": 32},
            "image": {"model": str(TINY_VQ), "resolution": 64, "batch_size": 8, "device": "cpu"}}


@contextlib.contextmanager
def pairs_server(n: int, seed: int, dead: int) -> Iterator[LocalServer]:
    """``n`` synthetic image-caption pairs on 127.0.0.1 (``server.captions``); image ``dead`` is a
    dead link."""
    pairs = make_pairs(n, seed=seed, size=80)
    files = {f"{i}.jpg": encode_image(im, quality=95) for i, (im, _) in enumerate(pairs) if i != dead}
    with LocalServer(files) as srv:
        srv.captions = [c for _, c in pairs]
        yield srv


def tokenize_job(tmp_path: Path, server: LocalServer, name: str, tokenize: Optional[dict[str, Any]] = None,
                 samples_per_shard: int = 8, **execution) -> JobSpec:
    """A job over every pair of ``server``: 64 px images, ``tokenize`` (default ``TOKENIZE``), the
    local engine, into ``tmp_path/name``."""
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [server.url(f"{i}.jpg") for i in range(len(server.captions))],
                             "caption": server.captions}), urls)
    data = {"name": name, "input": {"files": [str(urls)]},
            "download": {"image_size": 64, "allow_private_addresses": True, "timeout": 5},
            "tokenize": tokenize or TOKENIZE,
            "output": {"dir": str(tmp_path / name), "samples_per_shard": samples_per_shard},
            "execution": {"engine": "local", "progress": False, **execution}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_job(path)

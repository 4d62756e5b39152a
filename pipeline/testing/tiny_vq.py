"""Train the project's tiny VQ image tokenizer: transformers' own ``Emu3VQVAE`` with a small config,
on the synthetic shapes set (:mod:`pipeline.testing.synthetic`), on CPU in a few minutes.

    python -m pipeline.testing.tiny_vq      # into pipeline/testing/models/tiny-vq

64x64 RGB in, an 8x8 grid of ids from a 512-code codebook out. The result is saved with
``save_pretrained`` so that it loads the way users load any checkpoint
(``Emu3VQVAE.from_pretrained(PATH)``, or ``tokenize.image.model: PATH`` in a job).

Training is the usual VQ-VAE recipe, kept small: a short plain-autoencoder warm-up, the codebook
initialised from encoder outputs, then straight-through quantisation with codebook and commitment
losses, and unused codes restarted on random encoder outputs so that the codebook stays in use.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipeline.testing.assets import TINY_VQ

TINY_CONFIG = dict(
    codebook_size=512, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1, 2],
    num_res_blocks=1, attn_resolutions=[], hidden_size=64, num_attention_heads=1,
    temporal_downsample_factor=1,  # images only: no temporal compression
)
TRAIN_SEED, HELDOUT_SEED = 0, 1  # disjoint synthetic sets: held-out images are never trained on


@dataclass
class TrainConfig:
    size: int = 64
    n_train: int = 4096
    batch_size: int = 8
    steps: int = 2500
    warmup_steps: int = 150       # plain autoencoder before the codebook exists
    lr: float = 2e-3
    beta: float = 0.25            # commitment weight
    restart_every: int = 50       # restart codes unused over this many steps
    seed: int = 0
    threads: int = 1              # on a busy 2-core machine one thread ran 4x faster than two


def synthetic_images(n: int, seed: int, size: int = 64, start: int = 0) -> torch.Tensor:
    """uint8 (N, 3, size, size) images of the synthetic shapes set."""
    from pipeline.testing.synthetic import make_pairs

    arrays = [np.asarray(image.convert("RGB")) for image, _ in make_pairs(n, seed=seed, size=size, start=start)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two uint8 image batches (over all pixels)."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def mean_colour_baseline(images: torch.Tensor) -> torch.Tensor:
    """Each image replaced by its mean colour: the trivial reconstruction."""
    return images.float().mean(dim=(2, 3), keepdim=True).expand_as(images).round().to(torch.uint8)


def pooled_baseline(images: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """Each image average-pooled to the token grid (8x8 cells, 24-bit colour each: ~3x the bits of
    8x8 ids from 512 codes) and scaled back up bilinearly: a stronger simple baseline."""
    small = F.adaptive_avg_pool2d(images.float(), grid)
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)


def reconstruct(model, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Encode to ids and decode back, through the model's own public encode/decode."""
    out = []
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            sizes = torch.tensor([list(chunk.shape[-2:])] * len(chunk))
            ids = torch.stack(model.encode(to_unit(chunk), sizes).image_tokens)
            out.append(to_uint8(model.decode(ids)))
    return torch.cat(out)


class Trainer:
    """Straight-through VQ training of an Emu3VQVAE on single frames (T = 1)."""

    def __init__(self, model, config: TrainConfig):
        self.model = model
        self.config = config
        self.codebook = model.quantize.embedding.weight
        self.opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.99))
        self.usage = torch.zeros(len(self.codebook))

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, h, w) pre-quantisation latents, as Emu3VQVAE.encode computes them."""
        hidden = self.model.encoder(pixels.unsqueeze(1))
        return self.model.quant_conv(hidden.permute(0, 2, 1, 3, 4))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1])
        ids = torch.cdist(flat.detach(), self.codebook.detach()).argmin(dim=1)
        codes = self.codebook[ids].view(z.shape[0], *z.shape[2:], z.shape[1]).permute(0, 4, 1, 2, 3)
        vq_loss = F.mse_loss(codes, z.detach()) + self.config.beta * F.mse_loss(z, codes.detach())
        return z + (codes - z).detach(), vq_loss, ids

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, h, w) quantised latents -> (B, 3, H, W), as Emu3VQVAE.decode does."""
        post = self.model.post_quant_conv(quant)
        return self.model.decoder(post.permute(0, 2, 1, 3, 4), quant.permute(0, 2, 1, 3, 4))

    def init_codebook(self, images: torch.Tensor) -> None:
        with torch.no_grad():
            flat = self._sample_latents(images)
            pick = torch.randperm(len(flat))[: len(self.codebook)]
            self.codebook.copy_(flat[pick])

    def restart_unused(self, images: torch.Tensor) -> int:
        dead = (self.usage == 0).nonzero().flatten()
        if len(dead):
            with torch.no_grad():
                flat = self._sample_latents(images)
                self.codebook[dead] = flat[torch.randint(len(flat), (len(dead),))]
        self.usage.zero_()
        return len(dead)

    def _sample_latents(self, images: torch.Tensor) -> torch.Tensor:
        z = self.latents(to_unit(images))
        return z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1])

    def step(self, images: torch.Tensor, quantise: bool) -> float:
        x = to_unit(images)
        z = self.latents(x)
        if quantise:
            quant, vq_loss, ids = self.quantize(z)
            self.usage += torch.bincount(ids, minlength=len(self.usage)).float()
        else:
            quant, vq_loss = z, torch.zeros(())
        loss = F.mse_loss(self.decode(quant), x) + vq_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def train(out: Path, config: TrainConfig, log=lambda msg: print(msg, flush=True)) -> dict:
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    start = time.time()
    images = synthetic_images(config.n_train, TRAIN_SEED, config.size)
    held_out = synthetic_images(256, HELDOUT_SEED, config.size)
    model = Emu3VQVAE(Emu3VQVAEConfig(**TINY_CONFIG))
    model.train()
    trainer = Trainer(model, config)
    schedule = torch.optim.lr_scheduler.OneCycleLR(trainer.opt, config.lr, total_steps=config.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(config.seed)
    for step in range(config.steps):
        batch = images[torch.randint(len(images), (config.batch_size,), generator=g)]
        if step == config.warmup_steps:
            trainer.init_codebook(images[torch.randint(len(images), (64,), generator=g)])
        quantise = step >= config.warmup_steps
        loss = trainer.step(batch, quantise)
        schedule.step()
        restart = quantise and (step - config.warmup_steps + 1) % config.restart_every == 0
        if restart and step < config.steps - 2 * config.restart_every:  # the last codes settle
            restarted = trainer.restart_unused(images[torch.randint(len(images), (64,), generator=g)])
            log(f"step {step + 1}/{config.steps} loss {loss:.4f} restarted {restarted} codes "
                f"({time.time() - start:.0f}s)")
        elif (step + 1) % config.restart_every == 0:
            log(f"step {step + 1}/{config.steps} loss {loss:.4f} ({time.time() - start:.0f}s)")
    save(model.eval(), out)
    # Measure what was saved, loaded the way users load it (float16 weights, float32 compute).
    metrics = evaluate(Emu3VQVAE.from_pretrained(out), held_out)
    metrics.update(train_seconds=round(time.time() - start, 1), train=asdict(config))
    write_card(out, metrics)
    log(json.dumps(metrics, indent=1))
    return metrics


def evaluate(model, held_out: torch.Tensor) -> dict:
    rec = reconstruct(model, held_out)
    with torch.inference_mode():
        sizes = torch.tensor([list(held_out.shape[-2:])] * len(held_out))
        ids = torch.cat([torch.stack(model.encode(to_unit(c), sizes).image_tokens).flatten() for c in held_out.split(64)])
    return {
        "heldout_images": len(held_out), "heldout_seed": HELDOUT_SEED,
        "psnr_db": round(psnr(rec, held_out), 2),
        "psnr_mean_colour_db": round(psnr(mean_colour_baseline(held_out), held_out), 2),
        "psnr_pooled_8x8_db": round(psnr(pooled_baseline(held_out), held_out), 2),
        "codes_used": int(torch.unique(ids).numel()),
    }


def save(model, out: Path) -> None:
    """Weights in float16 (half the bytes in git) with ``dtype: float32`` in config.json, so that
    ``from_pretrained`` gives a float32 model that runs on any CPU."""
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out)
    model.float()
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_card(out: Path, metrics: dict) -> None:
    (out / "training.json").write_text(json.dumps(metrics, indent=1) + "\n")
    params = sum(t.numel() for t in load_file(out / "model.safetensors").values())
    (out / "README.md").write_text(MODEL_CARD.format(**metrics, params=params))


MODEL_CARD = """# tiny-vq

A tiny image tokenizer for mmcurate's demo and tests: transformers' `Emu3VQVAE` with a small config
({params:,} parameters), trained from scratch on the synthetic shapes set (`pipeline.testing.synthetic`,
seed 0) by `python -m pipeline.testing.tiny_vq` ({train_seconds:.0f} s on CPU).

- input: 64x64 RGB in [-1, 1]; output: an 8x8 grid of ids from a 512-code codebook
- weights stored in float16 (config `dtype: float32`: they load as float32)
- load: `Emu3VQVAE.from_pretrained(pipeline.testing.assets.TINY_VQ)`, or `tokenize.image.model: <that path>`

Held-out reconstruction ({heldout_images} images of seed {heldout_seed}; `training.json`):

| reconstruction | PSNR |
|---|---|
| tiny-vq (encode to ids, decode) | {psnr_db} dB |
| each image's mean colour | {psnr_mean_colour_db} dB |
| 8x8 average pool, bilinear upsample | {psnr_pooled_8x8_db} dB |

{codes_used} of 512 codes are used on the held-out set. It knows only this synthetic domain.
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TINY_VQ)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    args = parser.parse_args(argv)
    train(args.out, TrainConfig(steps=args.steps, threads=args.threads))


if __name__ == "__main__":
    main()

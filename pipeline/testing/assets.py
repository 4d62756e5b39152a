"""The bundled data of the demo and the tests, found through the package (it ships in the wheel):
the tiny CLIP and VQ checkpoints the project trains on its synthetic data, and the demo job."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
TINY_CLIP = MODELS / "tiny-clip"
TINY_CLIP_CONFIG = TINY_CLIP / "tiny-clip.json"
TINY_CLIP_WEIGHTS = TINY_CLIP / "tiny-clip.safetensors"
TINY_VQ = MODELS / "tiny-vq"
DEMO_JOB = HERE / "demo.yaml"

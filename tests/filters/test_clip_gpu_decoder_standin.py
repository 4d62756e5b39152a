"""clip_score on CUDA stand-ins (issue 19), beyond test_clip_gpu_standin.py: a CUDA scorer
tokenizes captions in a process of its own by default (finding 8), and a CUDA error that poisons
the context, raised by the GPU JPEG decoder, must fail the shard as it does in the model (finding 3)."""
import dataclasses

import pytest
import torch

from filters import build_filters
from filters.clip_scorer import ClipScorer
from pipeline.core.model_stage import DeviceLost
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS

torch.set_num_threads(2)


def clip_stage(**options):
    entry = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS), "batch_size": 8, **options}
    [stage] = build_filters([{"clip_score": entry}], check=True)
    return stage


@pytest.fixture(scope="module")
def clip():
    return clip_stage().model.clip


def test_a_cuda_scorer_tokenizes_captions_in_its_own_process_by_default(clip):
    # The scorer's choices follow clip.device; no CUDA call is made before a batch is scored.
    on_cuda = dataclasses.replace(clip, device=torch.device("cuda"))
    for model, wants_process in ((on_cuda, True), (clip, False)):
        scorer = ClipScorer(model, precision="fp32", decode="pil")
        try:
            assert (scorer.text_pool is not None) == wants_process, model.device
        finally:
            scorer.close()


def test_a_poisoned_context_in_the_gpu_jpeg_decoder_fails_the_shard(monkeypatch):
    import torchvision.io

    def poisoned(data, mode=None, device="cpu"):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", poisoned)
    stage = clip_stage(decode="torch")
    with pytest.raises(DeviceLost, match="illegal memory access"):
        stage.process(synthetic.make_batch(synthetic.make_pairs(4, seed=1, size=48)))
    assert stage.device_lost

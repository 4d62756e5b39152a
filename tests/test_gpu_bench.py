"""benchmarks/gpu.sh, the GPU benchmarks in one command: its CPU smoke run goes through every step
and writes the table for BENCHMARKS.md with every row; without a CUDA device it stops in one line;
the Emu3 preset it measures has the released tokenizer's shape."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from helpers.paths import REPO

SCRIPT = REPO / "benchmarks" / "gpu.sh"
COLUMNS = ["benchmark", "command", "baseline", "mmcurate", "ratio", "goal", "result"]


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "MMCURATE_GPU_BENCH_CPU_SMOKE"}
    environment.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=540)


def table(text: str) -> list[list[str]]:
    """The Markdown table's rows (header first, separator left out), each as its cells."""
    rows = [[cell.strip() for cell in line.strip()[1:-1].split(" | ")]
            for line in text.splitlines() if line.startswith("|")]
    return [r for r in rows if not all(set(cell) == {"-"} for cell in r)]


def load_tokenization_benchmark():
    spec = importlib.util.spec_from_file_location("tokenization_benchmark", REPO / "benchmarks" / "tokenization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two benchmark processes, each importing torch and open_clip or transformers: 40-85 s here
def test_cpu_smoke_writes_the_table_with_every_row(tmp_path):
    out = tmp_path / "results" / "gpu.md"
    done = run_script("--cpu-smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]

    text = out.read_text()
    assert "CPU smoke run" in text
    assert f"`benchmarks/gpu.sh --cpu-smoke --out {out}`" in text  # the command that made the table
    assert "torch.cuda.get_device_name()" in text and "load average" in text  # the machine, by its facts
    header, *rows = table(text)
    assert header == COLUMNS
    assert [r[0].split(":")[0] for r in rows] == [
        "CLIP scoring", "CLIP scoring against the plain open_clip loop (same run)", "tokenize_image"]
    assert all(len(r) == len(COLUMNS) for r in rows)
    clip, clip_ratio, vq = rows
    assert clip[1].startswith("`python -m benchmarks.clip --model ") and "--shards" not in clip[1]
    assert vq[1].startswith("`python benchmarks/tokenization.py --device cpu --preset emu3-tiny")
    for row in rows:
        assert re.search(r"\d[\d,]*(\.\d+)? (samples|img)/s$", row[3]), row  # a figure for the stage
        assert row[6] in ("met", "not met"), row
    assert re.search(r"\d[\d,]* samples/s$", clip_ratio[2]) and re.fullmatch(r"\d+\.\d\dx \(max score diff .+\)",
                                                                            clip_ratio[4])
    assert re.search(r"\d[\d,]*\.\d img/s$", vq[2]) and re.fullmatch(r"\d+%", vq[4])
    assert [r[5] for r in rows] == [">= 20,000 samples/s", ">= 3x the plain loop", ">= 60% of the model alone"]
    assert "Wall time: CLIP scoring" in text

    # Each goal's verdict is printed too, and agrees with the table.
    verdicts = re.findall(r"^goal (.+): (met|not met)$", done.stdout, flags=re.M)
    assert [v for _, v in verdicts] == [r[6] for r in rows]
    assert f"wrote {out}" in done.stdout


def test_without_a_cuda_device_it_stops_in_one_line(tmp_path):
    out = tmp_path / "gpu.md"
    done = run_script("--out", str(out), CUDA_VISIBLE_DEVICES="")  # hides a GPU where there is one
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no CUDA device visible" in done.stderr
    assert "--cpu-smoke" in done.stderr  # the way to a CPU check
    assert not out.exists()


def test_an_unknown_argument_is_refused_by_name():
    done = run_script("--fast")
    assert done.returncode == 2 and "unknown argument '--fast'" in done.stderr


def test_the_emu3_preset_is_the_released_tokenizers_shape():
    """Nothing can be downloaded, so the benchmark builds Emu3's VQ from a config: the published
    shape (transformers' Emu3VQVAEConfig defaults), 271M parameters."""
    import torch
    from transformers import Emu3VQVAEConfig

    bench = load_tokenization_benchmark()
    released = Emu3VQVAEConfig().to_dict()
    assert {k: released[k] for k in bench.PRESETS["emu3"]} == bench.PRESETS["emu3"]
    with torch.device("meta"):  # the shape without the memory
        model = bench.build_preset("emu3")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 271

"""The house rules that a change must not break: ARCHITECTURE.md's examples work (a newcomer can
add a filter from it alone), the project has no import cycle, modules stay small, the test
helpers stay out of the curation path, and the wheel holds every module and the demo's data."""
from __future__ import annotations

import ast
import io
import re
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers.paths import REPO

PACKAGES = ("pipeline", "filters", "catalogs")
MAX_LINES = 500
# What a wheel must hold: every module, the catalog cards and samples, the demo job and tiny models.
DATA = (*(f"{p}/**/*.py" for p in PACKAGES), "catalogs/*.yaml", "catalogs/samples/**/*", "pipeline/testing/demo.yaml",
        "pipeline/testing/models/**/*")


def code_blocks() -> dict[str, str]:
    """The python examples of ARCHITECTURE.md, by the heading they stand under."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    blocks, heading = {}, None
    for line_block in re.split(r"(^## .*$)", text, flags=re.M):
        if line_block.startswith("## "):
            heading = line_block[3:].strip()
            continue
        for code in re.findall(r"```python\n(.*?)```", line_block, flags=re.S):
            blocks[heading] = code
    return blocks


def load_example(heading: str) -> types.ModuleType:
    """The example under ``heading``, run as a module of its own (as if it were its own file)."""
    name = "architecture_example_" + re.sub(r"\W+", "_", heading.lower())
    module = sys.modules[name] = types.ModuleType(name)  # dataclasses look their module up
    exec(compile(code_blocks()[heading], f"ARCHITECTURE.md: {heading}", "exec"), module.__dict__)
    return module


def test_every_example_runs_against_todays_code():
    assert set(code_blocks()) == {"How to add a filter", "How to add a tokenizer", "How to add a sink",
                                  "How to add an executor"}
    from pipeline.core.stage import Stage
    from pipeline.executors.base import Executor
    from pipeline.sinks.base import Sink
    from pipeline.tokenize.models import VisualModel

    for heading, base in (("How to add a filter", Stage), ("How to add a tokenizer", VisualModel),
                          ("How to add a sink", Sink), ("How to add an executor", Executor)):
        example = load_example(heading)
        made = [v for v in vars(example).values() if isinstance(v, type) and issubclass(v, base) and v.__module__ == example.__name__]
        assert made, heading
        assert not getattr(made[0], "__abstractmethods__", None), f"{heading}: {made[0].__abstractmethods__}"


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, "JPEG")
    return buf.getvalue()


def test_a_filter_written_from_the_page_alone_runs_in_a_job(tmp_path, monkeypatch):
    from filters import FILTERS
    from pipeline.job.runner import run_job
    from pipeline.job.spec import load_job
    from pipeline.testing.serve import LocalServer

    example = load_example("How to add a filter")
    monkeypatch.setitem(FILTERS, "blocked_domains", example.BlockedDomainsFilter)  # "register it"
    with LocalServer({f"{i}.jpg": jpeg((40 * i, 80, 120)) for i in range(6)}, content_type="image/jpeg") as server:
        urls = [server.url(f"{i}.jpg") for i in range(6)]
        urls = [u.replace("127.0.0.1", "localhost") if i % 2 else u for i, u in enumerate(urls)]
        pq.write_table(__import__("pyarrow").table({"url": urls, "caption": [f"photo {i}" for i in range(6)]}),
                       tmp_path / "urls.parquet")
        spec = load_job(data={"input": {"files": [str(tmp_path / "urls.parquet")]},
                              "download": {"image_size": 32, "allow_private_addresses": True},
                              "filters": [{"blocked_domains": {"domains": ["localhost"]}}],
                              "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 4},
                              "execution": {"engine": "local", "progress": False}})
        result = run_job(spec)
    assert result.ok and result.status_counts == {"success": 3, "filtered": 3}
    table = pq.read_table(tmp_path / "out" / "00000.parquet").to_pydict()
    assert table["error_kind"][:2] == [None, "blocked_domains"]
    assert table["error_message"][1].startswith("localhost is blocked")
    with pytest.raises(Exception, match=r"filters\[0\]\.blocked_domains\.domain: unknown key"):
        load_job(data={"input": {"files": ["a"]}, "filters": [{"blocked_domains": {"domain": ["x"]}}]})


# -- the structure -------------------------------------------------------------------------------
def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_cycle_among_the_projects_modules():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_modules_stay_small():
    big = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_test_helpers_stay_out_of_the_curation_path():
    known = modules()
    users = {name for name, path in known.items() if not name.startswith("pipeline.testing")
             and any(t.startswith("pipeline.testing") for t in imports(name, path, known))}
    assert users == {"pipeline.cli.demo"}


# -- the wheel -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (a build in the checkout could pick up stale files)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True)
    (path,) = out.glob("mmcurate-*.whl")
    return path


def test_the_wheel_holds_every_module_and_the_data_the_demo_needs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(REPO)) for pattern in DATA for p in REPO.glob(pattern)
                if p.is_file() and "__pycache__" not in p.parts}
    assert len(expected) > 100 and "pipeline/tokenize/visual.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel: {missing}"


def test_the_installed_package_finds_its_data_without_the_checkout(wheel, tmp_path):
    """Every module imports from the unpacked wheel, outside the checkout, and the demo job's
    models are found through the package: its stages pass their checks."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = f"""
import importlib, yaml
from pathlib import Path
site = Path({str(site)!r})
for path in sorted(site.rglob("*.py")):
    parts = path.relative_to(site).with_suffix("").parts
    if parts[-1] == "__main__":
        continue  # running it is the command line
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    module = importlib.import_module(name)
    assert Path(module.__file__).is_relative_to(site), (name, module.__file__)
from pipeline.cli.demo import _rooted
from pipeline.job.build import build_stages
from pipeline.job.spec import load_job
from pipeline.testing.assets import DEMO_JOB
data = _rooted(yaml.safe_load(DEMO_JOB.read_text()))
stages = build_stages(load_job(data=data))
print([s.name for s in stages])
"""
    got = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.strip() == "['download', 'caption', 'dedup_exact', 'clip_score', 'tokenize_text', 'tokenize_image']"


@pytest.mark.slow
def test_the_demo_runs_from_the_installed_package(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    got = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--out", str(tmp_path / "demo")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900,
                         env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                              "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path)})
    assert got.returncode == 0, got.stderr[-3000:]
    assert "demo finished" in got.stdout and (tmp_path / "demo" / "report.html").exists()

"""Running ``mmcurate catalog ...`` in-process, as the catalog tests do."""
import json

from pipeline.cli.main import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """The exit code, stdout and stderr of ``mmcurate catalog *argv``."""
    code = main(["catalog", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys, *argv):
    """The parsed output of ``mmcurate catalog *argv --json`` (which must succeed)."""
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    return json.loads(out)

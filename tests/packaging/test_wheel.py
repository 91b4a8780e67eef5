"""The wheel users install: the runtime package and nothing else, built the way pip builds it.

Built once per session with pip from this checkout (hatchling, no isolation: the dev
environment has it), then installed with --no-deps into a directory that is put first on
sys.path, so the code that runs is the wheel's, not this checkout's.
"""

import json
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

RUNTIME = (
    "api",
    "planner",
    "ledger",
    "storage",
    "signals",
    "kube",
    "controller",
    "handlers",
    "worker",
    "batchapi",
)


@pytest.fixture(scope="module")
def wheel(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--wheel-dir", str(out), str(repo_root)],
        check=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("troughfill-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
         "--target", str(target), str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    return target


def test_the_wheel_holds_the_runtime_package_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    packages = {
        name.split("/")[1] for name in names if name.startswith("troughfill/") and name.count("/") > 1
    }
    assert set(RUNTIME) <= packages
    assert packages == {*RUNTIME, "sim"}, packages - {*RUNTIME, "sim"}
    tops = {name.split("/")[0] for name in names}
    assert tops == {"troughfill", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for unwanted in ("devenv", "localcluster", "demo", "bench", "nodeagent", "troughfill_dev", "examples"):
        assert not [name for name in names if unwanted in name], unwanted
    assert "troughfill/cli.py" in names
    assert not [name for name in names if name.endswith((".pyc", ".yaml", ".jsonl"))]


def test_numpy_and_matplotlib_are_needed_by_the_sim_extra_only(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
    requires = Parser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist") or []
    for package in ("numpy", "matplotlib"):
        (line,) = [r for r in requires if r.startswith(package)]
        assert "extra == 'sim'" in line or 'extra == "sim"' in line, line
    assert any(r.startswith("kopf") and "extra" not in r for r in requires)


def _run_installed(installed: Path, argv: list[str]) -> dict[str, object]:
    """`troughfill ARGV` from the installed wheel; which heavy modules it loaded."""
    probe = (
        "import contextlib, io, json, sys\n"
        "from troughfill.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        code = main({argv!r})\n"
        "    except SystemExit as stop:\n"
        "        code = stop.code\n"
        "import troughfill\n"
        "heavy = {'numpy', 'matplotlib', 'troughfill_dev', 'kopf'}\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & heavy)\n"
        "result = {'code': code, 'loaded': loaded, 'file': troughfill.__file__, 'out': out.getvalue()}\n"
        "print(json.dumps(result))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    assert str(result["file"]).startswith(str(installed)), result["file"]
    return result


def test_the_worker_command_loads_no_simulator_and_no_dev_tooling(installed: Path) -> None:
    result = _run_installed(installed, ["worker", "--help"])
    assert result["code"] == 0
    assert "run" in str(result["out"])
    assert result["loaded"] == [], result["loaded"]


def test_simulate_is_there_for_who_installs_the_extra(installed: Path) -> None:
    result = _run_installed(installed, ["simulate", "--help"])
    assert result["code"] == 0
    assert "--trace" in str(result["out"])
    assert "numpy" in result["loaded"]  # the dev environment has the extra installed

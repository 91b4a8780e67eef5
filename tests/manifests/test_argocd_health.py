"""Argo CD health checks and actions for troughfill's kinds, run as Argo CD runs them.

`argocd-lua` (scripts/argocd-lua, built by scripts/setup_k8s.sh) runs each Lua script on
gopher-lua, the interpreter Argo CD embeds, with the object as the global `obj`, over argo-cd's
own test layout: health_test.yaml and actions/action_test.yaml beside testdata/. The testdata
are objects troughfill's models accept, so the scripts read fields the operator really writes.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT
from troughfill import api
from troughfill_dev import argocdcm

CUSTOMIZATIONS = REPO_ROOT / "manifests" / "argocd" / "resource_customizations"
KINDS = {"BatchInference": api.BatchInference, "BatchPool": api.BatchPool, "ModelTemplate": api.ModelTemplate}


def argocd_lua() -> str:
    found = os.environ.get("TROUGHFILL_ARGOCD_LUA")
    if not found or not Path(found).is_file():
        raise FileNotFoundError("TROUGHFILL_ARGOCD_LUA is not set: source scripts/setup_k8s.sh")
    return found


def run_tests(root: Path) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run([argocd_lua(), str(root)], capture_output=True, text=True, timeout=60, check=False)
    assert done.stderr == "", done.stderr
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def test_every_health_check_and_action_passes_on_argo_cds_lua() -> None:
    code, results = run_tests(CUSTOMIZATIONS)
    failed = [r for r in results if not r["pass"]]
    assert failed == []
    assert code == 0
    by_kind: dict[str, set[str]] = {}
    for r in results:
        if r["test"] == "health":
            by_kind.setdefault(r["kind"], set()).add(r["got"]["status"])
    assert by_kind == {
        "troughfill.io/BatchInference": {"Progressing", "Healthy", "Degraded", "Suspended"},
        "troughfill.io/BatchPool": {"Progressing", "Healthy", "Degraded"},
        "troughfill.io/ModelTemplate": {"Progressing", "Healthy", "Degraded"},
    }
    actions = {r["test"] for r in results if r["kind"] == "troughfill.io/BatchInference"}
    assert {"discovery", "action suspend", "action resume", "action cancel"} <= actions


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    copy = tmp_path / "resource_customizations"
    shutil.copytree(CUSTOMIZATIONS, copy)
    tests_file = copy / "troughfill.io" / "BatchInference" / "health_test.yaml"
    tests = yaml.safe_load(tests_file.read_text())
    tests["tests"][0]["healthStatus"]["status"] = "Healthy"  # a job nobody admitted yet is not healthy
    tests_file.write_text(yaml.safe_dump(tests))
    action = copy / "troughfill.io" / "BatchInference" / "actions" / "cancel" / "action.lua"
    action.write_text("obj.spec.suspend = true\nreturn obj\n")  # the wrong field
    code, results = run_tests(copy)
    assert code == 1
    failed = {(r["test"], r["input"]) for r in results if not r["pass"]}
    assert failed == {("health", tests["tests"][0]["inputPath"]), ("action cancel", "testdata/running.yaml")}


def test_a_script_error_is_reported_not_passed(tmp_path: Path) -> None:
    copy = tmp_path / "resource_customizations"
    shutil.copytree(CUSTOMIZATIONS, copy)
    (copy / "troughfill.io" / "BatchPool" / "health.lua").write_text("return obj.status.nothing.here\n")
    # Argo CD opens no string library: a check that formats with it is Unknown there, failed here.
    (copy / "troughfill.io" / "ModelTemplate" / "health.lua").write_text(
        'return {status = "Healthy", message = string.format("%d", 1)}\n'
    )
    code, results = run_tests(copy)
    assert code == 1
    for kind in ("troughfill.io/BatchPool", "troughfill.io/ModelTemplate"):
        errors = [r for r in results if r["kind"] == kind]
        assert errors
        assert all(not r["pass"] and r["error"] for r in errors)


@pytest.mark.parametrize(
    "path",
    sorted(CUSTOMIZATIONS.glob("*/*/**/testdata/*.yaml")),
    ids=lambda p: str(p.relative_to(CUSTOMIZATIONS)),
)
def test_testdata_are_objects_troughfills_models_accept(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    kind = path.relative_to(CUSTOMIZATIONS).parts[1]
    assert obj["kind"] == kind
    KINDS[kind].model_validate(obj)


def test_argocd_cm_holds_exactly_the_scripts() -> None:
    assert argocdcm.main(["--check"]) == 0
    data = yaml.safe_load((REPO_ROOT / "manifests" / "argocd" / "argocd-cm.yaml").read_text())["data"]
    for kind in KINDS:
        health = (CUSTOMIZATIONS / "troughfill.io" / kind / "health.lua").read_text()
        assert data[f"resource.customizations.health.troughfill.io_{kind}"] == health
    actions = yaml.safe_load(data["resource.customizations.actions.troughfill.io_BatchInference"])
    assert sorted(d["name"] for d in actions["definitions"]) == ["cancel", "resume", "suspend"]

"""The `troughfill` command, run in-process."""

import json
from pathlib import Path

import pytest
import yaml

from tests.builders import batch_inference
from troughfill.cli import main, seniority_priority
from troughfill_dev.cli import main as dev_main


def test_crds_check_fails_when_stale_then_passes_after_generation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["crds", "--output", str(tmp_path), "--check"]) == 1
    assert "run `troughfill crds`" in capsys.readouterr().err
    assert main(["crds", "--output", str(tmp_path)]) == 0
    assert main(["crds", "--output", str(tmp_path), "--check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "batchinferences.troughfill.io.yaml",
        "batchpools.troughfill.io.yaml",
        "kustomization.yaml",
        "modeltemplates.troughfill.io.yaml",
    ]


def test_validate_reports_each_problem_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump_all(
            [
                batch_inference(name="good"),
                batch_inference(name="bad", minWorkers=5, maxWorkers=1, inputURL="ftp://x"),
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}},
                {"apiVersion": "troughfill.io/v1alpha1", "kind": "BatchJob", "metadata": {"name": "typo"}},
            ]
        )
    )
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "BatchInference/good: valid" in out
    assert "spec.inputURL: String should match pattern" in out
    assert "Pod/p: skipped (not a troughfill.io object)" in out  # a file may hold other kinds too
    assert "kind 'BatchJob' is not a troughfill resource" in out


def test_validate_accepts_the_examples(repo_root: Path) -> None:
    examples = sorted(
        str(p) for p in (repo_root / "manifests" / "examples").glob("*.yaml") if p.stem != "kustomization"
    )
    assert main(["validate", *examples]) == 0


def test_demo_admits_the_embedded_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert dev_main(["demo", "--check-only"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["admission"]["allowed"] is True
    assert report["admission"]["priorityClassName"] == "troughfill-batch"
    assert report["input"]["lines"] == report["input"]["valid"] == 240


def test_demo_fails_on_a_refused_job(
    tmp_path: Path, repo_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = repo_root / "manifests" / "examples"
    for path in examples.iterdir():
        (tmp_path / path.name).write_text(path.read_text())
    job = yaml.safe_load((examples / "batchinference.yaml").read_text())
    job["spec"]["engineArgs"] = [{"name": "enforce-eager", "value": "true"}]
    (tmp_path / "batchinference.yaml").write_text(yaml.safe_dump(job))
    assert dev_main(["demo", "--check-only", "--examples", str(tmp_path)]) == 1
    assert json.loads(capsys.readouterr().out)["admission"]["reason"] == "EngineArgNotAllowed"


def test_an_older_operator_replica_outranks_a_newer_one_and_ties_differ() -> None:
    """Kopf peering: the highest priority acts. A replica started later never outranks a live
    one (no take-over while it acts), and two started in the same millisecond differ."""
    started = 1_796_190_187.059
    assert seniority_priority(started) > seniority_priority(started + 0.002)
    assert seniority_priority(started + 3600) > 0
    same = {seniority_priority(started) for _ in range(50)}
    assert len(same) > 1
    assert max(same) < 2**53

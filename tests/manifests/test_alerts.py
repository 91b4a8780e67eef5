"""manifests/monitoring: the PrometheusRule's alerts, run by Prometheus's own `promtool test rules`
on synthetic series (tests/manifests/alerts_test.yaml), and tied to the metrics the operator
really exports."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO_ROOT
from troughfill import metrics

RULE = REPO_ROOT / "manifests" / "monitoring" / "prometheusrule.yaml"
RULE_TESTS = Path(__file__).with_name("alerts_test.yaml")


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool comes with Debian's prometheus package; run scripts/setup.sh"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120)


def rule_groups() -> dict[str, Any]:
    rule = yaml.safe_load(RULE.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    spec: dict[str, Any] = rule["spec"]
    return spec


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups()["groups"] for rule in group["rules"] if "alert" in rule]


def test_the_rules_pass_promtools_checks_and_their_unit_tests(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    shutil.copy(RULE_TESTS, tmp_path / "alerts_test.yaml")
    checked = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_unit_tested_both_firing_and_quiet() -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    for alert in alerts():
        mine = [c for c in checks if c["alertname"] == alert["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{alert['alert']}: never expected to fire"
        assert any(not c["exp_alerts"] for c in mine), f"{alert['alert']}: never expected to stay quiet"
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(alert["annotations"])


def exported_series() -> set[str]:
    """Every series name the operator's registry can expose (histogram and counter suffixes too)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in metrics.REGISTRY.collect() for suffix in suffixes[family.type]}


def test_every_metric_an_alert_reads_is_one_the_operator_exports() -> None:
    exported = exported_series()
    for alert in alerts():
        used = set(re.findall(r"\btroughfill_[a-z_]+", alert["expr"]))
        assert used, alert["alert"]
        assert used <= exported, f"{alert['alert']} reads {sorted(used - exported)}, not exported"


def test_the_monitoring_kustomization_is_the_rule_and_the_dashboard_in_the_operators_namespace() -> None:
    """It needs the Prometheus Operator's CRD (monitoring.coreos.com/v1), so it is applied on its own."""
    built = subprocess.run(
        [shutil.which("kubectl") or "kubectl", "kustomize", str(RULE.parent)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    objects = {o["kind"]: o for o in yaml.safe_load_all(built.stdout) if o}
    assert sorted(objects) == ["ConfigMap", "PrometheusRule"]
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"troughfill-system"}
    assert objects["PrometheusRule"]["spec"] == rule_groups()
    dashboard = objects["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["troughfill.json"])["uid"] == "troughfill"

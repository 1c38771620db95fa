"""The deployment artefacts under deploy/, checked by the real tools.

promtool (Debian package `prometheus`) checks and unit-tests the alert rules, amtool
(`prometheus-alertmanager`) checks the Alertmanager example, `notifier check-config` the example
config, systemd-analyze the units; the Grafana dashboard and the rules may only name metrics that
a notifier API really exports (read from a live /metrics registry on a real Redis). The tools are
required, not optional: scripts/install-ops-tools.sh installs them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import generate_latest
from pydantic import BaseModel

from notifier.api.state import ApiState
from notifier.breaker import FleetBreaker
from notifier.config import BreakerPolicy, Settings, settings_from_mapping
from notifier.metrics import SPECS, Metrics
from tests.support.servers import clean_env

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "notifier.json"
EXAMPLE = DEPLOY / "notifier.example.yaml"
UNITS = ["notifier-api.service", "notifier-worker@.service", "notifier-scheduler.service"]
METRIC = re.compile(r"\bnotifier_[a-z0-9_]+\b")
INSTALL_HINT = "run scripts/install-ops-tools.sh (apt-get install -y prometheus prometheus-alertmanager)"


def tool(name: str, hint: str = INSTALL_HINT) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed, so the deploy artefacts cannot be checked: {hint}")
    return path


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False, env=clean_env())


# -- what the API exports ---------------------------------------------------------------------

@pytest.fixture
def exported(redis_url: str, redis_client: redis.Redis) -> set[str]:
    """Every sample name a notifier API's /metrics shows, with a sample of every metric."""
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    data["redis_url"] = redis_url
    state = ApiState(settings_from_mapping(data, "example"))
    metrics = Metrics(redis_client)
    for spec in SPECS.values():
        labels = {name: "x" for name in spec.labels}
        if spec.kind == "counter":
            metrics.inc(spec.name, 1.0, **labels)
        else:
            metrics.observe(spec.name, 0.1, **labels)
    breaker = FleetBreaker(redis_client, "sms:aliyun-hz", BreakerPolicy())
    breaker.record_success(breaker.acquire())
    text = generate_latest(state.registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    assert "notifier_redis_up" in names, text[:2000]
    return names


def test_counters_are_exported_with_the_total_suffix(exported: set[str]) -> None:
    for spec in SPECS.values():
        if spec.kind == "counter":
            assert f"{spec.name}_total" in exported
            assert spec.name not in exported
        else:
            assert {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"} <= exported


# -- Prometheus rules -------------------------------------------------------------------------

def test_promtool_checks_the_rules() -> None:
    result = run([tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = run([tool("promtool"), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_and_a_runbook() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert alerts - firing == set(), "alerts never shown firing in rules.test.yml"
    assert alerts - quiet == set(), "alerts never shown staying quiet in rules.test.yml"
    operations = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    for rule in rules:
        anchor = rule["annotations"]["runbook_url"].split("#")[1]
        assert anchor == rule["alert"].lower()
        assert f"### {rule['alert']}" in operations, f"no runbook section for {rule['alert']}"


def test_rules_name_only_exported_metrics(exported: set[str]) -> None:
    names = set(METRIC.findall(RULES.read_text()))
    assert names, "no notifier metric in the rules?"
    assert names - exported == set()


# -- Grafana dashboard ------------------------------------------------------------------------

def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and var.get("type") == "query":
            exprs.append(query)
    return exprs


def test_dashboard_names_only_exported_metrics(exported: set[str]) -> None:
    used = {name for expr in _dashboard_exprs() for name in METRIC.findall(expr)}
    unknown = used - exported
    assert unknown == set(), f"dashboard queries metrics no notifier API exports: {sorted(unknown)}"


def test_dashboard_shows_every_metric(exported: set[str]) -> None:
    used = {name for expr in _dashboard_exprs() for name in METRIC.findall(expr)}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    wanted = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in exported}
    assert wanted - families == set(), "metrics with no dashboard panel"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (Grafana's variables filled in) as a recording rule."""
    rules = [{"record": f"dashboard:query:{i}",
              "expr": expr.replace("$__rate_interval", "5m").replace("$job", ".*")}
             for i, expr in enumerate(_dashboard_exprs()) if not expr.startswith("label_values(")]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# -- Alertmanager -----------------------------------------------------------------------------

def test_amtool_checks_the_alertmanager_example() -> None:
    result = run([tool("amtool"), "check-config", str(DEPLOY / "alertmanager.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_notifier_alert_reaches_the_second_path_whatever_its_severity() -> None:
    """A dead notifier cannot page about itself: each of its own alerts must route to the
    receiver that also mails from Alertmanager (the first matching route wins)."""
    rules = yaml.safe_load(RULES.read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for rule in alerts:
        labels = [f"{k}={v}" for k, v in {"alertname": rule["alert"], **rule.get("labels", {})}.items()]
        result = run([tool("amtool"), "config", "routes", "test",
                      f"--config.file={DEPLOY / 'alertmanager.yml'}", *labels])
        assert result.stdout.split() == ["notifier-self"], (rule["alert"], result.stdout,
                                                             result.stderr)


def test_alertmanager_example_posts_to_the_notifier_webhook_with_a_token() -> None:
    config = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    hooks = [h for r in config["receivers"] for h in r.get("webhook_configs", [])]
    assert hooks
    for hook in hooks:
        assert hook["url"] == "http://127.0.0.1:9095/v1/alertmanager"
        assert hook["send_resolved"] is True
        assert hook["max_alerts"] > 0
        auth = hook["http_config"]["authorization"]
        assert auth["type"] == "Bearer"
        assert "credentials" in auth or "credentials_file" in auth


# -- notifier.example.yaml --------------------------------------------------------------------

def test_the_example_secrets_file_names_every_variable_the_example_config_reads() -> None:
    """Providers are built per task, so a variable missing from /etc/notifier/env passes
    check-config and the worker's start, and then fails every send."""
    read = set(re.findall(r"_env:\s*([A-Z0-9_]+)", EXAMPLE.read_text()))
    given = {line.split("=", 1)[0] for line in (DEPLOY / "systemd" / "env.example").read_text()
             .splitlines() if line and not line.startswith("#")}
    assert read and read <= given, read - given


def test_example_config_passes_check_config() -> None:
    result = run([sys.executable, "-m", "notifier", "--config", str(EXAMPLE), "check-config"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def _models(root: type[BaseModel]) -> set[type[BaseModel]]:
    found: set[type[BaseModel]] = set()

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in found:
                found.add(annotation)
                for field in annotation.model_fields.values():
                    visit(field.annotation)
            return
        for arg in typing.get_args(annotation):
            visit(arg)

    visit(root)
    return found


def _fields_set(value: Any, seen: set[tuple[str, str]]) -> None:
    if isinstance(value, BaseModel):
        seen.update((type(value).__name__, name) for name in value.model_fields_set)
        for name in type(value).model_fields:
            _fields_set(getattr(value, name), seen)
    elif isinstance(value, dict):
        for item in value.values():
            _fields_set(item, seen)
    elif isinstance(value, list | tuple):
        for item in value:
            _fields_set(item, seen)


def test_example_config_shows_every_option() -> None:
    """Adding an option to notifier/config.py without showing it in the example fails here.

    An option is shown when the example sets it, or (for one that would be wrong to set in a
    production example) names it in a commented-out line `#   option: value`."""
    text = EXAMPLE.read_text(encoding="utf-8")
    settings = settings_from_mapping(yaml.safe_load(text))
    seen: set[tuple[str, str]] = set()
    _fields_set(settings, seen)
    commented = set(re.findall(r"^\s*#\s+([a-z_]+): \S", text, re.M))
    every = {(m.__name__, name) for m in _models(Settings) for name in m.model_fields}
    missing = sorted(f"{model}.{name}" for model, name in every - seen if name not in commented)
    assert missing == [], f"deploy/notifier.example.yaml does not show: {', '.join(missing)}"


def test_example_config_holds_no_secret() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for word in ("password:", "secret:", "access_key_id:", "access_key_secret:", "token:"):
        assert word not in text.lower(), f"{word} belongs in the environment, not the config"


# -- systemd ----------------------------------------------------------------------------------

def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify, with ExecStart pointed at this machine's `notifier` (the units name
    /opt/notifier/venv/bin/notifier, which verify would otherwise report as missing)."""
    analyze = tool("systemd-analyze", "apt-get install -y systemd (scripts/install-ops-tools.sh)")
    notifier = shutil.which("notifier")
    assert notifier, "the `notifier` console script is not on PATH (pip install -e .)"
    units = []
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        assert "/opt/notifier/venv/bin/notifier" in text
        assert "EnvironmentFile=/etc/notifier/env" in text
        assert not re.search(r"(?i)(token|secret|password)=", text), f"a secret in {name}"
        target = tmp_path / name.replace("@.", "@sms.")  # a template verifies as an instance
        target.write_text(text.replace("/opt/notifier/venv/bin/notifier", notifier))
        units.append(str(target))
    result = run([analyze, "verify", *units])
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and problems == [], "\n".join(problems)


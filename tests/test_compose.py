"""The container and monitoring files, checked offline (no Docker engine here):
docker-compose.yml against the Compose specification's schema, its settings
against service/settings.py, the Prometheus configuration and alert rules, the
Grafana provisioning and dashboard, whose every query must name metrics (and
labels) that service/metrics.py really exports, and the Dockerfile's shape.
The health-check commands themselves run against a live server in test_cli.py."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from service.metrics import Metrics
from service.settings import ENV_PREFIX, Settings, build_settings
from tests.deploy_files import COMPOSE, dockerfile_instructions

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "compose"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "reranker.json"
CHECK_JSONSCHEMA = str(pathlib.Path(sys.executable).with_name("check-jsonschema"))
SETTINGS = {ENV_PREFIX + spec.name.upper(): spec for spec in dataclasses.fields(Settings)}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def exported_series() -> dict[str, set[str]]:
    """Every series name the registry of service/metrics.py can expose, with its label names."""
    metrics = Metrics()
    # prometheus_client keeps a metric's label names in _labelnames (there is no public accessor).
    labels = {
        metric._name: set(metric._labelnames) for metric in vars(metrics).values() if hasattr(metric, "_labelnames")
    }
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    series = {}
    for family in metrics.registry.collect():
        for suffix in suffixes[family.type]:
            series[family.name + suffix] = labels[family.name] | ({"le"} if suffix == "_bucket" else set())
    return series


SERIES = exported_series()


def check_promql(expr: str) -> list[str]:
    """Problems with one PromQL expression: reranker_* names that are not
    exported, and label names (in selectors and by/without) no used metric has."""
    problems = []
    used = re.findall(r"\breranker_[a-z0-9_]+", expr)
    for name in used:
        if name not in SERIES:
            problems.append(f"{name} is not a metric that service/metrics.py exports")
    known = set().union(*(SERIES.get(name, set()) for name in used)) | TARGET_LABELS
    for name, selector in re.findall(r"\b(reranker_[a-z0-9_]+)\s*\{([^}]*)\}", expr):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector):
            if label not in SERIES.get(name, set()) | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in filter(None, (item.strip() for item in grouping.split(","))):
            if label not in known:
                problems.append(f"no metric in {expr!r} has the label {label!r}")
    return problems


def test_the_promql_check_catches_mistakes():
    assert check_promql('sum by (rpc) (rate(reranker_requests_total{code!="OK"}[5m]))') == []
    assert check_promql("rate(reranker_batch_size_bucket[5m])") == []
    assert check_promql("rate(reranker_requests[5m])")  # a counter without _total
    assert check_promql('reranker_queue_pairs{worker="0"}')  # a label it does not have
    assert check_promql("sum by (device) (reranker_batches_total)")


# -- docker-compose.yml ----------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification(tmp_path):
    done = subprocess.run(
        [CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The same validation refuses a misspelt key: it is not a rubber stamp.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("  healthcheck:", "  healthchek:", 1))
    refused = subprocess.run(
        [CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "healthchek" in refused.stdout + refused.stderr


def with_defaults(value: str) -> str:
    """Compose's ${NAME:-default} interpolation, with nothing set in the environment."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


@pytest.mark.parametrize("name, profile, device", [("reranker", "gpu", "auto"), ("reranker-cpu", "cpu", "cpu")])
def test_reranker_services(compose, name, profile, device):
    service = compose["services"][name]
    assert service["profiles"] == [profile]
    assert service["build"]["dockerfile"] == "Dockerfile"
    environment = {key: with_defaults(value) for key, value in service["environment"].items()}

    # Configured by environment: every RERANKER_* variable is a setting, and together they are valid.
    unknown = sorted(key for key in environment if key.startswith(ENV_PREFIX) and key not in SETTINGS)
    assert not unknown, f"not settings in service/settings.py: {unknown}"
    settings = build_settings(None, {key: value for key, value in environment.items() if key.startswith(ENV_PREFIX)})
    assert settings.model == "Qwen/Qwen3-Reranker-0.6B" and settings.device == device

    # The Hugging Face cache is mounted where HF_HOME points.
    assert any(volume.endswith(":" + environment["HF_HOME"]) for volume in service["volumes"])
    # The published ports are the ones the server listens on.
    published = {mapping.rsplit(":", 1)[1] for mapping in service["ports"]}
    assert published == {str(settings.port), str(settings.http_port), str(settings.metrics_port)}
    # The health check speaks the gRPC health protocol to the server's port.
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "reranker", "health"] and f"127.0.0.1:{settings.port}" in test


def test_gpu_reservation_only_in_the_gpu_profile(compose):
    devices = compose["services"]["reranker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in compose["services"]["reranker-cpu"]
    # The CPU service answers to the same name, so that one Prometheus target fits both.
    assert "reranker" in compose["services"]["reranker-cpu"]["networks"]["default"]["aliases"]


def test_monitoring_services_mount_files_that_exist(compose):
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
    assert "profiles" not in compose["services"]["prometheus"]  # monitoring runs under either profile


# -- Prometheus ------------------------------------------------------------------------------


def mounted(compose, service: str, target: str) -> pathlib.Path:
    """The repository file that `service` sees at `target`."""
    for volume in compose["services"][service]["volumes"]:
        source, container_path = volume.split(":")[:2]
        if container_path == target:
            return ROOT / source
        if target.startswith(container_path + "/"):
            return ROOT / source / target.removeprefix(container_path + "/")
    raise AssertionError(f"{service} does not mount anything at {target}")


def test_prometheus_scrapes_the_metrics_port(compose):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [target for group in jobs["reranker"]["static_configs"] for target in group["targets"]]
    environment = compose["services"]["reranker"]["environment"]
    assert targets == [f"reranker:{environment['RERANKER_METRICS_PORT']}"]
    assert jobs["reranker"].get("metrics_path", "/metrics") == "/metrics"
    assert mounted(compose, "prometheus", "/etc/prometheus/prometheus.yml") == DEPLOY / "prometheus" / "prometheus.yml"
    for rules in config["rule_files"]:
        assert mounted(compose, "prometheus", rules).is_file()


def test_alert_rules_use_exported_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in alerts}) == len(alerts) >= 8
    for rule in alerts:
        assert check_promql(rule["expr"]) == [], rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]


# -- Grafana ---------------------------------------------------------------------------------


def test_grafana_provisioning(compose):
    provisioning = mounted(compose, "grafana", "/etc/grafana/provisioning")
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [(source["type"], source["url"]) for source in datasources] == [("prometheus", "http://prometheus:9090")]
    providers = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert mounted(compose, "grafana", providers[0]["options"]["path"]) == DASHBOARD.parent
    assert DASHBOARD.is_file()


def dashboard_panels() -> list[dict]:
    return [panel for panel in json.loads(DASHBOARD.read_text())["panels"] if panel["type"] != "row"]


def test_dashboard_is_valid_and_names_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    datasource_uid = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ][0]["uid"]
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for variable in dashboard["templating"]["list"]:
        assert check_promql(variable["definition"]) == []
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource_uid
            assert check_promql(target["expr"]) == [], panel["title"]


def test_dashboard_shows_what_operators_need():
    """Throughput, latency percentiles, queue depth, batch fill and padding,
    worker state and busy fraction, restarts."""
    expressions = " ".join(target["expr"] for panel in dashboard_panels() for target in panel["targets"])
    for needed in (
        "rate(reranker_requests_total",  # throughput
        "rate(reranker_tokens_scored_total",
        "histogram_quantile(0.99, sum by (le) (rate(reranker_request_duration_seconds_bucket",  # latency percentiles
        "histogram_quantile(0.5,",
        "reranker_queue_pairs",  # queue depth
        "rate(reranker_batch_size_sum",  # batch fill
        "rate(reranker_batch_padded_tokens_total",  # padding efficiency
        "reranker_worker_ready",  # worker state
        "rate(reranker_worker_compute_seconds_total",  # busy fraction
        "increase(reranker_worker_restarts_total",  # restarts
    ):
        assert needed in expressions, needed


# -- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile():
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    arguments = {kind: value for kind, value in instructions}  # the last of each
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [value for kind, value in instructions if kind == "RUN"]
    torch_step = next(i for i, run in enumerate(runs) if "pip install" in run and "TORCH" in run)
    project_step = next(i for i, run in enumerate(runs) if 'pip install ".[quant,tracing]"' in run)
    assert torch_step < project_step
    assert "ARG TORCH=torch==2.13.0" in [f"{kind} {value}" for kind, value in instructions]
    assert arguments["USER"].split(":")[0] not in ("root", "0")
    assert kinds.index("USER") > max(
        i for i, kind in enumerate(kinds) if kind == "RUN"
    )  # nothing runs as root after it
    assert json.loads(arguments["ENTRYPOINT"]) == ["reranker"] and json.loads(arguments["CMD"]) == ["serve"]
    assert "reranker health" in arguments["HEALTHCHECK"]
    environment = " ".join(value for kind, value in instructions if kind == "ENV")
    for name in re.findall(r"\b(RERANKER_[A-Z0-9_]+)=", environment):
        assert name in SETTINGS, f"{name} is not a setting"
    assert "HF_HOME=/cache/huggingface" in environment
    # The image exposes the ports it listens on: gRPC, HTTP, metrics.
    variables = dict(re.findall(r"\b(RERANKER_[A-Z0-9_]+)=(\S+)", environment))
    ports = {variables[name] for name in ("RERANKER_PORT", "RERANKER_HTTP_PORT", "RERANKER_METRICS_PORT")}
    assert set(arguments["EXPOSE"].split()) == ports == {"50051", "8080", "9400"}

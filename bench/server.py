"""Starting the real server as a subprocess on a loopback port, with real
worker processes, for integration tests and benchmarks: its JSON log is read
as it arrives (the port it bound, its events), its metrics and health can be
asked, and it is stopped the way an orchestrator stops it (SIGTERM)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker.v1 import reranker_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Server:
    process: subprocess.Popen
    # Bounded, so that a long load run does not grow without end.
    lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=50_000))
    raw: collections.deque = field(default_factory=lambda: collections.deque(maxlen=50_000))
    port: int = 0
    metrics_port: int = 0
    http_port: int = 0  # 0: HTTP is off

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def channel(self, **options) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=list(options.items()))

    def stub(self) -> reranker_pb2_grpc.RerankerStub:
        return reranker_pb2_grpc.RerankerStub(self.channel())

    def events(self, name: str) -> list[dict]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def wait_for_event(self, name: str, timeout: float = 60.0, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {count} log event(s) {name!r} within {timeout}s; exit code {self.process.poll()}")

    def health(self, service: str = "") -> int:
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode} before serving")
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not become SERVING in time")

    def metrics(self) -> dict[str, float]:
        """The Prometheus exposition, as {'name{labels}': value}."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def metric(self, name: str, **labels) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def worker_pids(self) -> list[int]:
        """The model workers (spawned children that are not tokenizer processes)."""
        return [pid for pid in children(self.process.pid, "spawn_main") if command_name(pid) != "tokenizer"]

    def tokenizer_pids(self) -> list[int]:
        """The tokenizer processes (they name themselves `tokenizer`)."""
        return [pid for pid in children(self.process.pid, "spawn_main") if command_name(pid) == "tokenizer"]

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("server did not stop within the timeout after SIGTERM") from None
        return self.process.returncode

    def log_text(self) -> str:
        return "\n".join(list(self.raw)[-400:])


def wait_until(condition: Callable[[], object], what: str, timeout: float, interval: float = 0.02) -> object:
    """Poll `condition` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def children(pid: int, marker: str = "") -> list[int]:
    """Direct children of `pid` whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if parent == pid and marker in command:
            found.append(int(entry))
    return found


def command_name(pid: int) -> str:
    """/proc/<pid>/comm: what ps shows as the process's name ("" once it has gone)."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except FileNotFoundError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, for a server to bind later: from below the
    kernel's ephemeral range, and never the same twice in this process. (A port the
    kernel picks for a bind to 0 is an ephemeral one, which any outgoing connection
    may take as its source port before the server binds it: a busy test run did.)"""
    low = _ephemeral_ports_start()
    first = max(1024, low - 10_000)
    candidates = list(range(first, low))
    random.shuffle(candidates)
    for port in candidates:
        if port in _HANDED_OUT:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {first}..{low - 1}")


def _ephemeral_ports_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def start_server(
    model, *args: str, env: dict | None = None, wait: bool = True, entry: tuple[str, ...] = ("service", "serve")
) -> Server:
    """`python -m service serve --model MODEL ... ARGS` on 127.0.0.1 (free gRPC, HTTP and
    metrics ports), CPU workers, JSON logs, unless ARGS set those flags; returns once it
    listens and, with `wait`, once it is SERVING. `entry` names another module to run (with its arguments) in
    place of `service serve`, for servers with other workers."""
    defaults = {
        "--host": "127.0.0.1",
        "--port": "0",
        "--metrics-port": str(free_port()),
        "--http-port": str(free_port()),
        "--device": "cpu",
        "--log-format": "json",
    }
    # Each flag once (the command refuses a flag given twice): `args` wins over the defaults.
    given = {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}
    command = [sys.executable, "-m", *entry, "--model", str(model)]
    command += [part for flag, value in defaults.items() if flag not in given for part in (flag, value)]
    command += args
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    server = Server(process)

    def pump() -> None:
        assert process.stdout is not None  # stdout=PIPE
        for line in process.stdout:
            server.raw.append(line.rstrip())
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "listening":
                server.port = record["port"]
            if record.get("event") == "metrics_listening":
                server.metrics_port = record["port"]
            if record.get("event") == "http_listening":
                server.http_port = record["port"]
            server.lines.append(record)

    threading.Thread(target=pump, daemon=True).start()
    try:
        server.wait_for_event("listening")
        if wait:
            server.wait_serving()
    except BaseException:
        # A server that did not come up in time is not left running (with its workers) behind the error.
        with contextlib.suppress(AssertionError):
            server.stop()
        raise
    return server

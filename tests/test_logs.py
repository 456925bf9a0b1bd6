"""The log set-up (workers/logs.py): one JSON object per line on stderr, the same
keys from structlog's loggers and from stdlib ones (grpc, transformers, uvicorn),
the level filter applied to both, tracebacks as a field."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

EMIT = textwrap.dedent(
    """
    import logging, sys
    import structlog
    from workers.logs import configure_logging

    configure_logging(sys.argv[1], sys.argv[2])
    log = structlog.get_logger("rpc")
    structlog.contextvars.bind_contextvars(rpc="/reranker.v1.Reranker/Score", transport="grpc")
    log.debug("below the level", n=0)
    log.info("rpc", code="OK", ms=1.5)
    log.warning("slow", ms=900.0)
    logging.getLogger("grpc._server").info("foreign %s", "info")
    logging.getLogger("grpc._server").warning("foreign %s", "warning")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("failed")
    """
)


def emit(log_format: str, level: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", EMIT, log_format, level],
        cwd=pathlib.Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout == ""
    return done.stderr.splitlines()


def test_json_lines_carry_the_same_keys_from_every_logger_and_respect_the_level():
    records = [json.loads(line) for line in emit("json", "info")]
    assert [(r["logger"], r["level"], r["event"]) for r in records] == [
        ("rpc", "info", "rpc"),
        ("rpc", "warning", "slow"),
        ("grpc._server", "info", "foreign info"),
        ("grpc._server", "warning", "foreign warning"),
        ("rpc", "error", "failed"),
    ]
    for record in records:
        assert record["rpc"] == "/reranker.v1.Reranker/Score" and record["transport"] == "grpc"
        assert record["timestamp"].endswith("Z")
    assert records[0]["code"] == "OK" and records[0]["ms"] == 1.5
    assert "ZeroDivisionError: division by zero" in records[-1]["exception"]


def test_the_level_filters_structlog_and_stdlib_loggers_alike():
    records = [json.loads(line) for line in emit("json", "warning")]
    assert [r["event"] for r in records] == ["slow", "foreign warning", "failed"]


def test_the_console_format_is_readable_text_with_the_same_filter():
    lines = emit("console", "info")
    assert not any(line.startswith("{") for line in lines)
    assert sum("rpc" in line and "code" in line for line in lines) == 1
    assert sum("foreign warning" in line for line in lines) == 1
    assert any("ZeroDivisionError" in line for line in lines)
    assert not any("below the level" in line for line in lines)

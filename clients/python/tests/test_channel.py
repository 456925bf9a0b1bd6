"""The channel's retry policy, the bearer token and the deadline, seen by a small
in-test grpc.aio server that fails on purpose (no model, no running service
needed): attempts are counted by the server, and the metadata and deadline
that reach it are recorded (retry_server.py, beside this file)."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from retry_server import flaky_server

from reranker_client import AsyncRerankerClient, RerankerClient, RerankerError


@pytest.fixture(scope="module")
def flaky():
    with flaky_server() as (servicer, address):
        yield servicer, address


@pytest.mark.parametrize("code", ["UNAVAILABLE", "RESOURCE_EXHAUSTED"])
def test_retryable_codes_are_retried(flaky, code):
    servicer, address = flaky
    key = f"sync-{code}"
    with RerankerClient(address, max_attempts=3, timeout=30) as client:
        ranking = client.rerank(f"{code}:2", ["a"], request_id=key)
    assert ranking.request_id == key and [result.index for result in ranking.results] == [0]
    assert servicer.attempts[key] == 3


def test_async_client_retries(flaky):
    servicer, address = flaky

    async def call():
        async with AsyncRerankerClient(address, max_attempts=3, timeout=30) as client:
            return await client.rerank("UNAVAILABLE:2", ["a"], request_id="async")

    assert asyncio.run(call()).request_id == "async"
    assert servicer.attempts["async"] == 3


@pytest.mark.parametrize(
    "max_attempts, query, code, attempts",
    [
        (1, "UNAVAILABLE:2", grpc.StatusCode.UNAVAILABLE, 1),  # retries off
        (3, "UNAVAILABLE:5", grpc.StatusCode.UNAVAILABLE, 3),  # retries stop at max_attempts
        (3, "INVALID_ARGUMENT:5", grpc.StatusCode.INVALID_ARGUMENT, 1),  # other codes are not retried
    ],
)
def test_retries_end_with_the_status(flaky, max_attempts, query, code, attempts):
    servicer, address = flaky
    with (
        RerankerClient(address, max_attempts=max_attempts, timeout=30) as client,
        pytest.raises(RerankerError) as error,
    ):
        client.rerank(query, ["a"], request_id=query)
    assert error.value.code == code
    assert error.value.message == f"attempt {attempts} fails on purpose"
    assert servicer.attempts[query] == attempts


def test_token_and_deadline_reach_the_server(flaky):
    servicer, address = flaky
    with RerankerClient(address, token="s3cret", timeout=7) as client:
        client.rerank("OK:0", ["a"], request_id="with-token")
        client.rerank("OK:0", ["a"], request_id="own-timeout", timeout=2)
    with RerankerClient(address) as client:
        client.rerank("OK:0", ["a"], request_id="no-token")
    assert servicer.metadata["with-token"]["authorization"] == "Bearer s3cret"
    assert "authorization" not in servicer.metadata["no-token"]
    # Each call carries its deadline: the client's 7 s, the call's own 2 s, the default 30 s.
    # (gRPC rounds a deadline up a little on the wire; hence the + 0.5.)
    remaining = servicer.time_remaining
    assert 0 < remaining["own-timeout"] <= 2.5 < remaining["with-token"] <= 7.5 < remaining["no-token"] <= 30.5

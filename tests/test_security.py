"""TLS, mutual TLS and bearer tokens: accepted and refused as they should be,
health exempt from tokens, no secret in the logs."""

from __future__ import annotations

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("client.example")
    stranger_cert = trustme.CA().issue_cert("client.example")  # signed by a CA the server does not trust
    paths = {"ca": folder / "ca.pem", "tokens": folder / "tokens"}
    ca.cert_pem.write_to_path(paths["ca"])
    server_cert.private_key_pem.write_to_path(folder / "server.key")
    for blob in server_cert.cert_chain_pems:
        blob.write_to_path(folder / "server.pem", append=True)
    paths.update(key=folder / "server.key", cert=folder / "server.pem")
    paths["tokens"].write_text(
        f"# accepted tokens\n{TOKEN}\n  # an indented comment\n\t# a tabbed one\n  another-token  \n\n"
    )

    def credentials(cert=None):
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems) if cert else None
        key = cert.private_key_pem.bytes() if cert else None
        return grpc.ssl_channel_credentials(ca.cert_pem.bytes(), key, chain)

    paths["client"] = lambda: credentials(client_cert)
    paths["no_client_cert"] = lambda: credentials()
    paths["stranger"] = lambda: credentials(stranger_cert)
    return paths


def secure(server, credentials):
    # the certificate names localhost; connect by address and check that name
    return grpc.secure_channel(server.address, credentials, options=[("grpc.ssl_target_name_override", "localhost")])


def rerank(channel, token: str | None = None):
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    return reranker_pb2_grpc.RerankerStub(channel).Rerank(
        pb.RerankRequest(query="q", documents=["a", "b"]), timeout=15, metadata=metadata
    )


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def test_tls(pki, tiny_model, server_factory):
    server = server_factory(
        tiny_model,
        "--workers-per-device",
        "1",
        "--tls-cert",
        str(pki["cert"]),
        "--tls-key",
        str(pki["key"]),
        wait=False,
    )
    with secure(server, pki["no_client_cert"]()) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        _wait_serving(health)
        assert len(rerank(channel).results) == 2
    with server.channel() as plaintext:
        assert code_of(lambda: rerank(plaintext)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_and_tokens(pki, tiny_model, server_factory):
    server = server_factory(
        tiny_model,
        "--workers-per-device",
        "1",
        "--tls-cert",
        str(pki["cert"]),
        "--tls-key",
        str(pki["key"]),
        "--tls-client-ca",
        str(pki["ca"]),
        "--auth-tokens-file",
        str(pki["tokens"]),
        env={"RERANKER_AUTH_TOKENS": "from-the-environment"},
        wait=False,
    )
    with secure(server, pki["client"]()) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        _wait_serving(health)  # health needs no token, so that orchestrators can probe
        assert len(rerank(channel, TOKEN).results) == 2
        assert len(rerank(channel, "another-token").results) == 2
        assert len(rerank(channel, "from-the-environment").results) == 2
        for token in (None, "", "wrong", TOKEN + "x", TOKEN[:-1], "#", "# an indented comment"):
            assert code_of(lambda token=token: rerank(channel, token)) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            reranker_pb2_grpc.RerankerStub(channel).RerankStream(
                pb.RerankRequest(query="q", documents=["a"]), timeout=15
            ).next()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in error.value.details()
    for credentials in (pki["no_client_cert"](), pki["stranger"]()):
        with secure(server, credentials) as channel:
            assert code_of(lambda: rerank(channel, TOKEN)) == grpc.StatusCode.UNAVAILABLE
    with server.channel() as plaintext:
        assert code_of(lambda: rerank(plaintext, TOKEN)) == grpc.StatusCode.UNAVAILABLE
    log = server.log_text()
    assert TOKEN not in log and "from-the-environment" not in log and "BEGIN" not in log
    assert any(line.get("code") == "UNAUTHENTICATED" for line in server.events("rpc"))


def _wait_serving(health, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError("not SERVING in time")

"""Settings: flags over RERANKER_* variables over defaults, every bad value named."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from service.settings import (
    CPU_BATCH_TOKENS,
    CPU_HEAD_CACHE_BYTES,
    CUDA_BATCH_TOKENS,
    CUDA_HEAD_CACHE_BYTES,
    Settings,
    add_arguments,
    build_settings,
    parse_devices,
    summary,
)


def parse(argv, environ=None) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build_settings(parser.parse_args(argv), environ or {})


def test_flags_win_over_environment_over_defaults():
    settings = parse(
        ["--model", "m", "--max-batch-tokens", "20000"],
        {"RERANKER_MAX_BATCH_TOKENS": "9000", "RERANKER_MAX_WAIT_MS": "5"},
    )
    assert settings.max_batch_tokens == 20000
    assert settings.max_wait_ms == 5.0
    assert settings.max_batch_size == 256  # default
    assert parse([], {"RERANKER_MODEL": "from-env"}).model == "from-env"


def test_every_setting_has_a_flag_or_is_environment_only():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {action.dest for action in parser._actions}
    for spec in dataclasses.fields(Settings):
        assert (spec.name in flags) != bool(spec.metadata.get("env_only")), spec.name
        assert spec.metadata["help"], spec.name


def test_tokens_only_from_the_environment_and_never_in_the_summary():
    settings = parse(["--model", "m"], {"RERANKER_AUTH_TOKENS": "a, b"})
    assert settings.auth_tokens == ("a", "b") and settings.accepted_tokens() == ("a", "b")
    assert "a, b" not in repr(summary(settings)) and summary(settings)["auth"] is True


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        ([], {}, "model is required"),
        (
            ["--model", "m", "--max-batch-tokens", "100"],
            {},
            "max_batch_tokens (100) must hold one pair of max_length (8192)",
        ),
        (["--model", "m", "--max-batch-tokens", "-1"], {}, "max_batch_tokens must be 0 (per device) or at least"),
        (
            ["--model", "m"],
            {"RERANKER_LAYOUT": "tree"},
            "RERANKER_LAYOUT='tree'; choose one of auto, padded, packed, cascade",
        ),
        (["--model", "m", "--workers-per-device", "0"], {}, "workers_per_device must be at least 1"),
        (
            ["--model", "m", "--head-cache-bytes", "-2"],
            {},
            "head_cache_bytes must be -1 (per device), 0 (off) or a byte count, got -2",
        ),
        (["--model", "m", "--tls-cert", "c"], {}, "tls_cert and tls_key go together"),
        (["--model", "m", "--max-queue-pairs", "10"], {}, "max_queue_pairs (10) must hold one full request"),
        (["--model", "m"], {"RERANKER_MAX_LENGTH": "lots"}, "RERANKER_MAX_LENGTH='lots' is not a valid int"),
        (["--model", "m"], {"RERANKER_DTYPE": "int4"}, "RERANKER_DTYPE='int4'; choose one of auto, fp32"),
        (
            ["--model", "m", "--layout", "cascade", "--attn-implementation", "eager"],
            {},
            "layout cascade runs with attn_implementation sdpa, not eager",
        ),
    ],
)
def test_bad_values_are_named(argv, environ, message):
    with pytest.raises(ValueError) as error:
        parse(argv, environ)
    assert message in str(error.value)


def test_devices():
    assert parse_devices("auto", 0) == ["cpu"]
    assert parse_devices("auto", 2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:1,cpu", 2) == ["cuda:1", "cpu"]
    with pytest.raises(ValueError, match="no GPU is visible"):
        parse_devices("cuda", 0)
    with pytest.raises(ValueError, match="cuda:3 was asked for, but 2 GPU"):
        parse_devices("cuda:3", 2)
    with pytest.raises(ValueError, match="'gpu0' is not cpu, cuda or cuda:N"):
        parse_devices("gpu0", 1)


def test_the_tokens_file_format(tmp_path):
    """Stripped first, then blank lines and # comments skipped: an indented comment is no token."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# accepted\n  alpha  \n\n   # indented\n\t# tabbed\n\tbeta\n")
    assert Settings(model="m", auth_tokens_file=str(tokens)).accepted_tokens() == ("alpha", "beta")
    tokens.write_text("#\n   # only comments\n \t \n")
    with pytest.raises(ValueError, match=r"holds no token .* refusing to start with authentication off"):
        Settings(model="m", auth_tokens_file=str(tokens)).accepted_tokens()
    tokens.write_text("two words\n")
    with pytest.raises(ValueError, match="line 1: a token cannot hold whitespace"):
        Settings(model="m", auth_tokens_file=str(tokens)).accepted_tokens()


def test_the_batch_budget_is_per_device_unless_given():
    settings = parse(["--model", "m"])
    assert settings.max_batch_tokens == 0 and settings.layout == "auto"
    assert settings.batch_tokens("cpu") == CPU_BATCH_TOKENS < settings.max_length  # a longer pair runs alone
    assert settings.batch_tokens("cuda:0") == CUDA_BATCH_TOKENS
    # on CUDA the default always holds one pair of max_length
    assert parse(["--model", "m", "--max-length", "40960"]).batch_tokens("cuda:1") == 40960
    given = parse(["--model", "m", "--max-batch-tokens", "9000"])
    assert given.batch_tokens("cpu") == given.batch_tokens("cuda:0") == 9000


def test_the_head_cache_is_per_device_unless_given():
    settings = parse(["--model", "m"])
    assert settings.head_cache_bytes == -1
    assert settings.head_cache("cpu") == CPU_HEAD_CACHE_BYTES > 0
    assert settings.head_cache("cuda:0") == CUDA_HEAD_CACHE_BYTES == 0  # never measured on a GPU: off
    given = parse(["--model", "m"], {"RERANKER_HEAD_CACHE_BYTES": "1000000"})
    assert given.head_cache("cpu") == given.head_cache("cuda:1") == 1_000_000
    assert parse(["--model", "m", "--head-cache-bytes", "0"]).head_cache("cpu") == 0

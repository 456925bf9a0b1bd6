"""The contract: committed stubs are what grpcio-tools makes of the proto, and the
proto keeps the conventions of well-kept APIs."""

from __future__ import annotations

import itertools
import pathlib
import subprocess
import sys

from reranker.v1 import reranker_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The stubs are committed in the client package, which the server depends on.
CLIENT = ROOT / "clients" / "python"


def test_stubs_match_the_proto(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_stubs.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert any(p.suffix == ".py" for p in generated), "nothing was generated"
    for relative in generated:
        committed = CLIENT / relative
        assert committed.exists(), f"{relative} is generated but not committed: run make proto"
        assert committed.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{relative} drifted from the proto: run make proto"
        )


def test_enums_start_unspecified():
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        first = enum.values_by_number[0]
        assert first.name == f"{_upper_snake(enum.name)}_UNSPECIFIED", enum.name


def test_package_and_rpcs():
    assert pb.DESCRIPTOR.package == "reranker.v1"
    service = pb.DESCRIPTOR.services_by_name["Reranker"]
    shapes = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming) for m in service.methods
    }
    assert shapes == {
        "Rerank": ("RerankRequest", "RerankResponse", False, False),
        "RerankStream": ("RerankRequest", "RerankStreamResponse", False, True),
        "RerankMany": ("RerankRequest", "RerankResponse", True, True),
        "Score": ("ScoreRequest", "ScoreResponse", False, False),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False, False),
    }


def test_every_field_is_documented():
    lines = (ROOT / "proto" / "reranker" / "v1" / "reranker.proto").read_text().splitlines()
    undocumented = []
    for before, line in itertools.pairwise(lines):
        words = line.split()
        is_field = (
            line.rstrip().endswith(";")
            and "=" in words
            and words[0] not in ("option", "syntax", "package")
            and not words[0].isupper()
        )
        if is_field and not before.strip().startswith("//"):
            undocumented.append(line.strip())
    assert not undocumented


def _upper_snake(name: str) -> str:
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()

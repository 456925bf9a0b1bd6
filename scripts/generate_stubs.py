"""Generate the Python gRPC stubs from proto/ with grpcio-tools.

The stubs live in the client package (clients/python: the `reranker` import
package, next to `reranker_client`), which the server depends on too; they are
committed so that a plain `pip install` needs no code generation.
`tests/test_proto.py` regenerates them into a scratch folder and fails when the
committed copies drift from the proto.

    python scripts/generate_stubs.py            # rewrite clients/python/reranker/v1/*_pb2*.py
    python scripts/generate_stubs.py --out DIR  # write them under DIR instead
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
CLIENT = ROOT / "clients" / "python"
PROTOS = ["reranker/v1/reranker.proto"]
PACKAGES = ["reranker", "reranker/v1"]


def generate(out: pathlib.Path) -> None:
    """Write the stubs and the package markers under `out`."""
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see its message above")
    for package in PACKAGES:
        marker = out / package / "__init__.py"
        if not marker.exists():
            marker.write_text('"""Generated from proto/ by scripts/generate_stubs.py; do not edit."""\n')
    # PEP 561: type checkers read the .pyi stubs (for the `raw` messages of reranker_client's results).
    (out / PACKAGES[0] / "py.typed").write_text("")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=pathlib.Path, default=CLIENT, help="folder to write into (default: clients/python)"
    )
    generate(parser.parse_args(argv).out)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The `reranker` command: `serve` runs the service; `rerank`, `score`, `info` and
`batch` call one; `health` asks one over the gRPC health protocol (exit 0 only
when SERVING, for container health checks); `demo-model` writes a tiny random
model for trying things."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from service.settings import add_arguments, build_settings

_GIVEN = "_flags_given"  # where _StoreOnce notes the flags seen; removed after parsing


class _StoreOnce(argparse._StoreAction):
    """The plain `store` action, refusing a flag given twice: `--query a --query b`
    would otherwise keep "b" without a word. (Flags meant to repeat, such as
    --doc, use `append`.)"""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.option_strings:
            given = namespace.__dict__.setdefault(_GIVEN, set())
            if self.dest in given:
                raise argparse.ArgumentError(self, "may be given only once")
            given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """The command's parsers: single-value flags refuse repeats."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)


class _Subcommand(_Parser):
    """A subcommand reports its own mistakes, with its own usage (`usage: reranker
    score ...`): argparse would hand the flags it does not know up to the top-level
    parser, whose usage says nothing about them."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error("unrecognized arguments: " + " ".join(extras))
        return namespace, extras


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="reranker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Subcommand)

    serve = commands.add_parser("serve", help="run the gRPC service")
    add_arguments(serve)

    def client_command(name: str, help: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help)
        command.add_argument("--target", default="localhost:50051", help="host:port of the service")
        command.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
        command.add_argument("--token", default="", help="bearer token, if the service asks for one")
        command.add_argument("--tls", action="store_true", help="use TLS (system roots, or --ca)")
        command.add_argument("--ca", default="", help="PEM file of the CA to trust")
        return command

    rerank = client_command("rerank", help="rank documents for one query and print the ranking")
    rerank.add_argument("--query", required=True)
    rerank.add_argument("--doc", action="append", required=True, help="a document; repeat for each")
    rerank.add_argument("--instruction", default="")
    rerank.add_argument("--top-n", type=int, default=0)
    rerank.add_argument("--json", action="store_true", help="print the response as JSON")

    score = client_command("score", help="score (query, document) pairs: one line per --doc, in order")
    score.add_argument("--query", required=True)
    score.add_argument("--doc", action="append", required=True, help="a document; repeat to score several")
    score.add_argument("--instruction", default="")

    client_command("info", help="print the model and the server's limits")

    batch = client_command(
        "batch", help="rerank JSON lines {query, documents[, instruction, top_n, id]} from a file or stdin"
    )
    batch.add_argument("input", nargs="?", default="-", help="JSON-lines file; - for stdin")
    batch.add_argument("--output", default="-", help="where to write the rankings as JSON lines; - for stdout")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")

    health = client_command("health", help="ask the gRPC health service; exit 0 only when it answers SERVING")
    health.add_argument(
        "--service",
        default="",
        help="the service to ask about, e.g. reranker.v1.Reranker; empty means the whole server",
    )
    health.set_defaults(timeout=5.0)

    demo = commands.add_parser(
        "demo-model", help="write a tiny random-weight Qwen3 reranker (real tokenizer) for trying the service"
    )
    demo.add_argument("directory")

    args = parser.parse_args(argv)
    vars(args).pop(_GIVEN, None)
    if args.command == "serve":
        from service.server import run

        try:
            settings = build_settings(args)
        except ValueError as exc:
            parser.error(str(exc))
        return run(settings)
    if args.command == "demo-model":
        from workers.demo import build_tiny_model

        print(build_tiny_model(args.directory))
        return 0
    if args.command == "health":
        return _health(args)
    return _client_command(args)


def _client_command(args: argparse.Namespace) -> int:
    from reranker_client import RerankerClient, RerankerError

    options = {"timeout": args.timeout, "token": args.token, "tls": args.tls or bool(args.ca)}
    try:
        if args.ca:
            options["root_certificates"] = _read_bytes(args.ca)
        if args.command == "batch":
            lines = _read_lines(args.input)
    except _CannotRead as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        with RerankerClient(args.target, **options) as client:
            if args.command == "rerank":
                ranking = client.rerank(args.query, args.doc, instruction=args.instruction, top_n=args.top_n)
                if args.json:
                    print(json.dumps(_message_json(ranking.raw), ensure_ascii=False, indent=2))
                else:
                    for rank, result in enumerate(ranking.results, 1):
                        flag = " (truncated)" if result.truncated else ""
                        values = f"score={result.score:.4f} logit={result.logit:+.4f}"
                        print(f"{rank:>3}. {values}  [{result.index}] {args.doc[result.index][:80]!r}{flag}")
            elif args.command == "score":
                scores = client.score([(args.query, doc) for doc in args.doc], instruction=args.instruction)
                for result in scores.results:  # in input order: one line per --doc
                    print(f"score={result.score:.6f} logit={result.logit:+.6f}")
            elif args.command == "info":
                print(json.dumps(_message_json(client.model_info().raw), ensure_ascii=False, indent=2))
            elif args.command == "batch":
                return _batch(client, args, lines)
    except RerankerError as error:
        print(f"error: {error.code.name}: {error.message or _meaning(error.code)}", file=sys.stderr)
        return 1
    return 0


class _CannotRead(Exception):
    pass


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise _CannotRead(f"cannot read {path}: {error.strerror or error}") from None


def _read_lines(path: str) -> list[str]:
    """Every line of `path` (- for stdin), blank ones included: error messages name
    the file's real line numbers. (Split at newlines only, as JSON lines are: not
    str.splitlines(), which also splits at U+2028 and other characters JSON strings
    may hold.)"""
    if path == "-":
        return list(sys.stdin)
    try:
        with open(path, encoding="utf-8") as file:
            return list(file)
    except OSError as error:
        raise _CannotRead(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise _CannotRead(f"cannot read {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _meaning(code) -> str:
    """Words for a status that came without a message of its own."""
    import grpc

    return {
        grpc.StatusCode.UNIMPLEMENTED: "the server does not offer this call",
        grpc.StatusCode.UNAUTHENTICATED: "the server wants a bearer token (--token)",
    }.get(code, "the server gave no details")


def _message_json(message) -> dict:
    """A message as protobuf's JSON mapping, with every field (index 0, zeros, empty
    lists included) under its JSON name, and 64-bit counts as numbers rather than
    strings where a JSON number holds them exactly."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)


def _health(args: argparse.Namespace) -> int:
    """grpc.health.v1 Check: prints the status; 0 when SERVING, 1 for anything else
    (NOT_SERVING, an unknown service, no answer within --timeout)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from reranker_client import ChannelOptions

    try:
        root_certificates = _read_bytes(args.ca) if args.ca else None
    except _CannotRead as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    options = ChannelOptions(
        args.target, max_attempts=1, tls=args.tls or bool(args.ca), root_certificates=root_certificates
    )
    with options.open(grpc) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            code = error.code()
            if error.details():
                message = error.details()
            elif code == grpc.StatusCode.NOT_FOUND:  # the health service says nothing more
                message = f'the server knows no service "{args.service}"'
            elif code == grpc.StatusCode.UNIMPLEMENTED:
                message = "the server has no gRPC health service"
            else:
                message = _meaning(code)
            print(f"error: {code.name}: {message}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def _batch_request(record, number: int):
    """A RerankRequest from one parsed line, or ValueError with a message for people."""
    from reranker_client import rerank_request

    if not isinstance(record, dict):
        raise ValueError("not a JSON object ({query, documents, ...})")
    for name in ("query", "documents"):
        if name not in record:
            raise ValueError(f'missing field "{name}"')
    query, documents = record["query"], record["documents"]
    if not isinstance(query, str):
        raise ValueError('"query" must be a string')
    if not isinstance(documents, list) or not all(isinstance(document, str) for document in documents):
        raise ValueError('"documents" must be a list of strings')
    instruction = record.get("instruction", "")
    if not isinstance(instruction, str):
        raise ValueError('"instruction" must be a string')
    top_n = record.get("top_n", 0)
    if isinstance(top_n, bool) or not isinstance(top_n, int):
        raise ValueError('"top_n" must be an integer')
    return rerank_request(
        query, documents, instruction=instruction, top_n=top_n, request_id=str(record.get("id", number))
    )


def _batch(client, args: argparse.Namespace, lines: list[str]) -> int:
    """Send every line over one RerankMany stream; write one JSON line per answer.
    A line that is not a request ({query, documents, ...}) is answered with an
    error of its own without being sent. Blank lines are skipped; line numbers
    are the file's."""
    import grpc
    from tqdm import tqdm

    from reranker.v1 import reranker_pb2 as pb
    from reranker_client import RequestFailed

    requests, unreadable = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"not JSON: {exc}") from None
            requests.append(_batch_request(record, number))
        except ValueError as exc:  # one bad line must not sink the others
            error = pb.RequestError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=f"line {number}: {exc}")
            unreadable.append(pb.RerankResponse(request_id=str(number), error=error))
    total = len(requests) + len(unreadable)

    with contextlib.ExitStack() as stack:
        try:
            sink = sys.stdout if args.output == "-" else stack.enter_context(open(args.output, "w", encoding="utf-8"))
        except OSError as error:
            print(f"error: cannot write {args.output}: {error.strerror or error}", file=sys.stderr)
            return 2
        failures = 0
        answers = (
            client.rerank_many(iter(requests), timeout=max(args.timeout, 1.0) * max(1, len(requests)))
            if requests
            else []
        )
        with tqdm(total=total, disable=args.no_progress, file=sys.stderr, unit="req") as progress:
            for message in unreadable:
                failures += 1
                sink.write(json.dumps(_message_json(message), ensure_ascii=False) + "\n")
                progress.update(1)
            for answer in answers:
                failures += isinstance(answer, RequestFailed)
                sink.write(json.dumps(_message_json(answer.raw), ensure_ascii=False) + "\n")
                progress.update(1)
        sink.flush()
    if failures:
        print(f"{failures} of {total} requests failed; see their error fields", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

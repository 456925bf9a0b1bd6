"""The `reranker` command: `serve` runs the service; `rerank`, `score`, `info` and
`batch` call one; `health` asks one over the gRPC health protocol (exit 0 only
when SERVING, for container health checks); `demo-model` writes a tiny random
model for trying things."""

from __future__ import annotations

import argparse
import itertools
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
    from google.protobuf.json_format import MessageToDict

    from reranker_client import RerankerClient, RerankerError

    options = {"timeout": args.timeout, "token": args.token, "tls": args.tls or bool(args.ca)}
    if args.ca:
        options["root_certificates"] = open(args.ca, "rb").read()
    try:
        with RerankerClient(args.target, **options) as client:
            if args.command == "rerank":
                response = client.rerank(args.query, args.doc, instruction=args.instruction, top_n=args.top_n)
                if args.json:
                    print(json.dumps(MessageToDict(response.raw), ensure_ascii=False, indent=2))
                else:
                    for rank, result in enumerate(response.results, 1):
                        flag = " (truncated)" if result.truncated else ""
                        print(
                            f"{rank:>3}. score={result.score:.4f} logit={result.logit:+.4f}  [{result.index}] {args.doc[result.index][:80]!r}{flag}"
                        )
            elif args.command == "score":
                scores = client.score([(args.query, doc) for doc in args.doc], instruction=args.instruction)
                for result in scores.results:  # in input order: one line per --doc
                    print(f"score={result.score:.6f} logit={result.logit:+.6f}")
            elif args.command == "info":
                print(json.dumps(MessageToDict(client.model_info().raw), indent=2))
            elif args.command == "batch":
                return _batch(client, args)
    except RerankerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _health(args: argparse.Namespace) -> int:
    """grpc.health.v1 Check: prints the status; 0 when SERVING, 1 for anything else
    (NOT_SERVING, an unknown service, no answer within --timeout)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from reranker_client import ChannelOptions

    root_certificates = open(args.ca, "rb").read() if args.ca else None
    options = ChannelOptions(
        args.target, max_attempts=1, tls=args.tls or bool(args.ca), root_certificates=root_certificates
    )
    with options.open(grpc) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def _batch(client, args: argparse.Namespace) -> int:
    """Send every line over one RerankMany stream; write one JSON line per answer.
    A line that is not a request ({query, documents, ...}) is answered with an
    error of its own without being sent."""
    import grpc
    from google.protobuf.json_format import MessageToDict
    from tqdm import tqdm

    from reranker.v1 import reranker_pb2 as pb
    from reranker_client import rerank_request

    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    lines = [line for line in source if line.strip()]
    requests, unreadable = [], []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            requests.append(
                rerank_request(
                    record["query"],
                    record["documents"],
                    instruction=record.get("instruction", ""),
                    top_n=int(record.get("top_n", 0)),
                    request_id=str(record.get("id", number)),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # one bad line must not sink the others
            error = pb.RequestError(
                code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=f"line {number}: {type(exc).__name__}: {exc}"
            )
            unreadable.append(pb.RerankResponse(request_id=str(number), error=error))

    sink = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    failures = 0
    answers = (
        client.rerank_many(iter(requests), timeout=max(args.timeout, 1.0) * max(1, len(requests))) if requests else []
    )
    with tqdm(total=len(lines), disable=args.no_progress, file=sys.stderr, unit="req") as progress:
        # The typed answers' messages: a failed request's has its `error` set.
        for response in itertools.chain(unreadable, (answer.raw for answer in answers)):
            failures += response.HasField("error")
            sink.write(json.dumps(MessageToDict(response), ensure_ascii=False) + "\n")
            progress.update(1)
    sink.flush()
    if failures:
        print(f"{failures} of {len(lines)} requests failed; see their error fields", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

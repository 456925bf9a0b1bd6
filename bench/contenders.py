"""The contenders of bench.compare, each scoring a workload on the same weights.

  card                   the model card's code as written: batches of 8 in input
                         order, left padding, vocabulary-sized logits everywhere
  card-keep1             the same with logits_to_keep=1 (last position only)
  card-sorted            card-keep1 on all of the workload's pairs at once, sorted
                         by length, 8 per batch: the strongest simple program
                         with the card's code (its latency is the whole run's)
  sentence-transformers  CrossEncoder on a sequence-classification copy of the
                         weights (one output: the "yes" row minus the "no" row)
  engine                 workers.scoring.Scorer fed the batches the service's
                         planner (service.batcher.PendingQueue) makes
  service                the gRPC service itself: one worker process, driven by
                         concurrent grpc.aio clients

The in-process ones (but card-sorted) score one request at a time, as a program
that calls the library per incoming request would, and each runs in a fresh process so that
its memory high-water mark is its own. All return logit(yes) - logit(no).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import pathlib
import resource
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from bench.common import Stopwatch
from bench.workloads import Request
from workers.prompt import DEFAULT_INSTRUCTION, SUFFIX, SYSTEM_PREFIX, EncodedPair, format_body
from workers.protocol import ScoreBatch

SERVICE = "service"
PAD_TOKEN = "<|endoftext|>"
RPC_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Setup:
    """What every contender shares: the weights, the device and the limits."""

    model_dir: str
    precision: str  # a workers.precision name: fp32, bf16, fp16, int8, nf4
    device: str
    threads: int  # torch threads in process; --cpu-threads for the service
    batch_size: int  # rows per batch for the card recipes and sentence-transformers
    max_length: int
    max_batch_tokens: int  # the service's planner limits, for the engine and the service (0: the device's)
    max_batch_size: int
    min_padding_efficiency: float
    classifier_dir: str = ""  # the sequence-classification copy, for sentence-transformers
    layout: str = "auto"  # workers.layout, for the engine and the service
    head_cache_bytes: int = -1  # the worker's head cache, for the engine and the service (-1: the device's)


@dataclass
class Run:
    """What one contender did on a list of requests."""

    scores: list[list[float]] = field(default_factory=list)  # logits per request
    latencies: list[float] = field(default_factory=list)  # seconds per request
    seconds: float = 0.0  # wall clock for all the requests
    computed_tokens: int = 0  # tokens the transformer body ran, padding included
    peak_memory_bytes: int | None = None
    memory_source: str = ""
    error: str = ""


# ---------------------------------------------------------------- in process


class Reranker(Protocol):
    """An in-process contender: logits for one request's documents."""

    @property
    def embeddings(self) -> torch.nn.Module:
        """The input embedding layer, where every token the body computes goes in."""

    def __call__(self, query: str, documents: Sequence[str]) -> list[float]: ...


class WorkloadReranker(Protocol):
    """An in-process contender that takes the whole workload at once."""

    @property
    def embeddings(self) -> torch.nn.Module: ...

    def __call__(self, query: str, documents: Sequence[str]) -> list[float]: ...

    def score_workload(self, requests: Sequence[Request]) -> list[list[float]]: ...


class CardRecipe:
    """The Qwen3-Reranker model card's code, kept as written (its tokenization,
    `tokenizer.pad`, batches in input order, the default cache), with only the
    model's precision and device taken from the setup."""

    def __init__(self, setup: Setup, keep_last: bool) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(setup.model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(
            setup.model_dir, device_map={"": setup.device}, **model_arguments(setup.precision)
        ).eval()
        self.prefix_tokens = self.tokenizer.encode(SYSTEM_PREFIX, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(SUFFIX, add_special_tokens=False)
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.no = self.tokenizer.convert_tokens_to_ids("no")
        self.setup = setup
        self.keep = {"logits_to_keep": 1} if keep_last else {}

    @property
    def embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def process_inputs(self, pairs: list[str]):
        budget = self.setup.max_length - len(self.prefix_tokens) - len(self.suffix_tokens)
        inputs = self.tokenizer(
            pairs, padding=False, truncation="longest_first", return_attention_mask=False, max_length=budget
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.setup.max_length)
        return {key: value.to(self.model.device) for key, value in inputs.items()}

    @torch.no_grad()
    def __call__(self, query: str, documents: Sequence[str]) -> list[float]:
        pairs = [format_body(DEFAULT_INSTRUCTION, query, document) for document in documents]
        scores: list[float] = []
        for start in range(0, len(pairs), self.setup.batch_size):
            inputs = self.process_inputs(pairs[start : start + self.setup.batch_size])
            logits = self.model(**inputs, **self.keep).logits[:, -1, :]
            scores += (logits[:, self.yes] - logits[:, self.no]).float().tolist()
        return scores


class SortedCardRecipe(CardRecipe):
    """card-keep1 given every pair of the workload at once: tokenized, sorted by
    length, scored 8 (the batch size) at a time, so that batches pad little."""

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup, keep_last=True)

    @torch.no_grad()
    def score_workload(self, requests: Sequence[Request]) -> list[list[float]]:
        pairs = [format_body(DEFAULT_INSTRUCTION, r.query, d) for r in requests for d in r.documents]
        budget = self.setup.max_length - len(self.prefix_tokens) - len(self.suffix_tokens)
        bodies = self.tokenizer(pairs, padding=False, truncation="longest_first", max_length=budget)["input_ids"]
        order = sorted(range(len(bodies)), key=lambda index: len(bodies[index]))
        flat = [0.0] * len(pairs)
        for start in range(0, len(order), self.setup.batch_size):
            chosen = order[start : start + self.setup.batch_size]
            ids = [self.prefix_tokens + bodies[index] + self.suffix_tokens for index in chosen]
            padded = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
            inputs = {key: value.to(self.model.device) for key, value in padded.items()}
            logits = self.model(**inputs, **self.keep).logits[:, -1, :]
            for index, logit in zip(chosen, (logits[:, self.yes] - logits[:, self.no]).float().tolist(), strict=True):
                flat[index] = logit
        scores, used = [], 0
        for request in requests:
            scores.append(flat[used : used + len(request.documents)])
            used += len(request.documents)
        return scores


class SentenceTransformersReranker:
    """CrossEncoder on the sequence-classification copy, its logits unsquashed.
    The prompt is split where the seq-cls Qwen3 rerankers split it: the query
    side ends before `<Document>:`, so both sides tokenize as the card's body."""

    def __init__(self, setup: Setup) -> None:
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(
            setup.classifier_dir,
            device=setup.device,
            max_length=setup.max_length,
            activation_fn=torch.nn.Identity(),
            model_kwargs=model_arguments(setup.precision),
        )
        self.batch_size = setup.batch_size

    @property
    def embeddings(self) -> torch.nn.Module:
        from transformers import PreTrainedModel

        return next(
            module for module in self.model.modules() if isinstance(module, PreTrainedModel)
        ).get_input_embeddings()

    def __call__(self, query: str, documents: Sequence[str]) -> list[float]:
        head = SYSTEM_PREFIX + format_body(DEFAULT_INSTRUCTION, query, "").removesuffix("<Document>: ")
        pairs = [(head, f"<Document>: {document}{SUFFIX}") for document in documents]
        return self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False).tolist()


class EngineReranker:
    """This project's scorer with the service's tokenizer and batch planner, in process."""

    def __init__(self, setup: Setup) -> None:
        from tokenizers import Tokenizer

        from service.settings import Settings
        from workers.prompt import PromptEncoder
        from workers.scoring import load_scorer

        # The service's budget and head cache: the given ones, or its defaults for the device.
        defaults = Settings(model=setup.model_dir, max_length=setup.max_length, head_cache_bytes=setup.head_cache_bytes)
        self.scorer = load_scorer(
            setup.model_dir,
            setup.device,
            setup.precision,
            layout=setup.layout,
            head_cache_bytes=defaults.head_cache(setup.device),
        )
        self.budget = setup.max_batch_tokens or defaults.batch_tokens(setup.device)
        self.encoder = PromptEncoder(
            Tokenizer.from_file(str(pathlib.Path(setup.model_dir) / "tokenizer.json")), setup.max_length
        )
        self.setup = setup

    @property
    def embeddings(self) -> torch.nn.Module:
        return self.scorer.embeddings

    def __call__(self, query: str, documents: Sequence[str]) -> list[float]:
        pairs = self.encoder.encode([(query, document) for document in documents])
        scores = [0.0] * len(pairs)
        setup = self.setup
        for batch in plan_batches(pairs, self.budget, setup.max_batch_size, setup.min_padding_efficiency):
            logits, _ = self.scorer.score(ScoreBatch.from_pairs(0, [pairs[index] for index in batch]))
            for index, logit in zip(batch, logits.tolist(), strict=True):
                scores[index] = logit
        return scores


def plan_batches(
    pairs: Sequence[EncodedPair], max_tokens: int, max_rows: int, min_efficiency: float
) -> list[list[int]]:
    """The service's own batch planning (service.batcher.PendingQueue), as pair indices."""
    from service.batcher import PendingQueue
    from service.work import Job, QueuedPair

    queue = PendingQueue()
    job = Job(pairs)
    for index, pair in enumerate(pairs):
        queue.push(QueuedPair(job, index, index, 0.0, pair.length))
    batches = []
    while len(queue):
        items, _ = queue.plan(max_tokens, max_rows, min_efficiency)
        for item in items:
            queue.remove(item)
        batches.append([item.index for item in items])
    return batches


RERANKERS: dict[str, Callable[[Setup], Reranker | WorkloadReranker]] = {
    "card": lambda setup: CardRecipe(setup, keep_last=False),
    "card-keep1": lambda setup: CardRecipe(setup, keep_last=True),
    "card-sorted": SortedCardRecipe,
    "sentence-transformers": SentenceTransformersReranker,
    "engine": EngineReranker,
}
CONTENDERS = (*RERANKERS, SERVICE)


class TokenCounter:
    """Counts the token ids that reach an embedding layer: every token the
    transformer body computes, padding included, whoever batched them."""

    def __init__(self, embeddings: torch.nn.Module) -> None:
        self.tokens = 0
        embeddings.register_forward_pre_hook(self._count)

    def _count(self, _module: torch.nn.Module, args: tuple) -> None:
        self.tokens += args[0].numel()


def model_arguments(precision: str) -> dict:
    """from_pretrained arguments for a precision, exactly as the service's workers load it."""
    from workers.scoring import _precision_arguments

    return _precision_arguments(precision)


def measure(name: str, setup: Setup, requests: Sequence[Request]) -> Run:
    """Load contender `name`, warm it up on two documents, then score the
    requests one at a time. Meant for a fresh process (see run_in_process)."""
    quiet()
    torch.set_num_threads(setup.threads)
    reranker = RERANKERS[name](setup)
    counter = TokenCounter(reranker.embeddings)
    reranker(requests[0].query, requests[0].documents[:2])
    counter.tokens = 0
    sync = torch.cuda.synchronize if setup.device.startswith("cuda") else None
    run = Run()
    with Stopwatch(sync) as total:
        if hasattr(reranker, "score_workload"):
            run.scores = reranker.score_workload(requests)
        else:
            for request in requests:
                with Stopwatch(sync) as watch:
                    run.scores.append(reranker(request.query, request.documents))
                run.latencies.append(watch.seconds)
    if not run.latencies:  # every request was answered when the whole run ended
        run.latencies = [total.seconds] * len(requests)
    run.seconds, run.computed_tokens = total.seconds, counter.tokens
    if sync:
        run.peak_memory_bytes, run.memory_source = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        run.peak_memory_bytes, run.memory_source = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "ru_maxrss",
        )
    return run


def quiet() -> None:
    """No progress bars or advice from transformers: the benchmark's output is its table."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    # The card's own code passes max_length to tokenizer.pad, which transformers warns about.
    warnings.filterwarnings("ignore", message="`max_length` is ignored when `padding`=`True`")


def run_in_process(name: str, setup: Setup, requests: Sequence[Request]) -> Run:
    """`measure` in a fresh spawned process, so that its peak memory is this
    contender's alone (and CUDA is never forked)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, name, setup, tuple(requests)).result()


# ---------------------------------------------------------------- the service


def run_service(setup: Setup, requests: Sequence[Request], clients: int) -> Run:
    """Start `python -m service serve` with one worker, warm it up, and drive it
    with `clients` concurrent grpc.aio clients that share the requests."""
    from bench.server import start_server

    server = start_server(
        setup.model_dir, "--device", setup.device, "--dtype", setup.precision, "--workers-per-device", "1",
        "--cpu-threads", str(setup.threads), "--max-length", str(setup.max_length),
        "--max-batch-tokens", str(setup.max_batch_tokens), "--max-batch-size", str(setup.max_batch_size),
        "--min-padding-efficiency", str(setup.min_padding_efficiency), "--layout", setup.layout,
        "--head-cache-bytes", str(setup.head_cache_bytes),
        "--score-cache-bytes", "0",  # every contender computes every pair, the warm-up's included
    )  # fmt: skip
    try:
        (worker,) = server.worker_pids()
        asyncio.run(drive(server.address, [Request(requests[0].query, requests[0].documents[:2])], 1))
        before = server.metric("reranker_batch_padded_tokens_total")
        run = asyncio.run(drive(server.address, requests, clients))
        run.computed_tokens = round(server.metric("reranker_batch_padded_tokens_total") - before)
        run.peak_memory_bytes, run.memory_source = worker_peak_memory(worker, setup.device)
        return run
    finally:
        server.stop()


async def drive(address: str, requests: Sequence[Request], clients: int) -> Run:
    """Send every request once, `clients` at a time; each client sends its next
    request when the previous one is answered."""
    import grpc

    from reranker.v1 import reranker_pb2 as pb
    from reranker.v1 import reranker_pb2_grpc

    run = Run(scores=[[] for _ in requests], latencies=[0.0] * len(requests))
    pending = iter(range(len(requests)))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reranker_pb2_grpc.RerankerStub(channel)

        async def client() -> None:
            for index in pending:
                request = requests[index]
                with Stopwatch() as watch:
                    response = await stub.Rerank(
                        pb.RerankRequest(query=request.query, documents=request.documents), timeout=RPC_TIMEOUT_S
                    )
                run.latencies[index] = watch.seconds
                logits = [0.0] * len(request.documents)
                for result in response.results:
                    logits[result.index] = result.logit
                run.scores[index] = logits

        with Stopwatch() as total:
            await asyncio.gather(*(client() for _ in range(clients)))
    run.seconds = total.seconds
    return run


def worker_peak_memory(pid: int, device: str) -> tuple[int | None, str]:
    """The worker's memory high-water mark: VmHWM on the CPU; on CUDA what
    nvidia-smi says the process holds (the caching allocator keeps its peak),
    when it lists the process at all (in containers it often does not)."""
    if not device.startswith("cuda"):
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), "VmHWM"
    import subprocess

    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    for line in listing.splitlines():
        owner, _, mib = (part.strip() for part in line.partition(","))
        if owner == str(pid) and mib.isdigit():
            return int(mib) * 2**20, "nvidia-smi used_memory"
    return None, "nvidia-smi (process not listed)"


# ---------------------------------------------------------------- the weights


def sequence_classification_copy(model_dir: str, directory: str) -> str:
    """The checkpoint as a one-output sequence classifier: the transformer body
    unchanged, the head `yes` row minus `no` row (kept in float32), no bias,
    and the pad token set so that the classifier finds each row's last token.
    The tokenizer goes without its chat template: sentence-transformers would
    otherwise render every pair as chat messages instead of the card's prompt."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from workers.demo import copy_tokenizer
    from workers.prompt import answer_token_ids

    tokenizer = Tokenizer.from_file(str(pathlib.Path(model_dir) / "tokenizer.json"))
    yes, no = answer_token_ids(tokenizer)
    language_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    config = language_model.config
    config.num_labels, config.pad_token_id = 1, tokenizer.token_to_id(PAD_TOKEN)
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config)
    classifier.model = language_model.model
    rows = language_model.get_output_embeddings().weight[[yes, no]].detach().float()
    classifier.score = torch.nn.Linear(config.hidden_size, 1, bias=False)
    classifier.score.weight.data = (rows[0] - rows[1])[None]
    classifier.save_pretrained(directory)
    copy_tokenizer(directory, model_dir)
    tokenizer_config = pathlib.Path(directory) / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings.pop("chat_template", None)
    tokenizer_config.write_text(json.dumps(settings, indent=2))
    return directory

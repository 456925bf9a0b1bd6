"""Benchmark workloads made of real text that ships with Python.

Random tokens would make every pair the same length and tokenize unlike real
text, so documents here are standard-library docstrings and queries are the
names of the functions they document. Selection is seeded: the same Python
version and seed give the same requests everywhere (the docstrings themselves
change between Python versions, so results record the version).

    a  RAG: one query and 50 documents of 30 to 500 tokens per request
    b  many small requests: one query and 5 such documents, from 64 clients
    c  long documents: one query and 4 documents of about 4,000 tokens

The clients are the service's: a: 4 and c: 2 (a few users at once, so that it
can overlap tokenizing and transport with compute, as it is built to), b: 64.
The in-process contenders take one request at a time.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import pathlib
import random
from dataclasses import dataclass
from functools import cache

from tokenizers import Tokenizer

# Pure-Python standard-library modules with many documented functions; any a
# build lacks is skipped.
MODULES = [
    "argparse",
    "ast",
    "asyncio.streams",
    "asyncio.tasks",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "email.utils",
    "enum",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookies",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "logging.handlers",
    "mailbox",
    "mimetypes",
    "netrc",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pkgutil",
    "platform",
    "poplib",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "sysconfig",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "typing",
    "unittest.case",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zipimport",
]


@dataclass(frozen=True)
class Request:
    query: str
    documents: tuple[str, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    requests: tuple[Request, ...]
    clients: int  # concurrent gRPC clients for the service


@dataclass(frozen=True)
class Spec:
    """How a workload is drawn, and its default size on a CPU."""

    description: str
    documents: int
    clients: int
    requests: int  # default request count
    card_requests: int  # default for the slow full-logits recipe


SPECS = {
    "a": Spec("RAG: 1 query + 50 documents of 30-500 tokens", documents=50, clients=4, requests=4, card_requests=1),
    "b": Spec(
        "small requests: 1 query + 5 documents, 64 clients", documents=5, clients=64, requests=128, card_requests=4
    ),
    "c": Spec(
        "long documents: 1 query + 4 documents of ~4,000 tokens", documents=4, clients=2, requests=2, card_requests=1
    ),
}
SHORT_TOKENS = (30, 500)
LONG_TOKENS = 4000


@cache
def docstrings() -> tuple[tuple[str, str], ...]:
    """(qualified name, docstring) of public functions, classes and methods, sorted by name.

    Read from the modules' source files, not from the imported modules: libraries
    patch the standard library at import (transformers adds a method to
    logging.Logger), which would make the text depend on what was imported first."""
    found: dict[str, str] = {}
    for module_name in MODULES:
        spec = importlib.util.find_spec(module_name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        tree = ast.parse(pathlib.Path(spec.origin).read_text(encoding="utf-8"))
        for node in _public_definitions(tree):
            members = [(node.name, node)]
            if isinstance(node, ast.ClassDef):
                members += [(f"{node.name}.{child.name}", child) for child in _public_definitions(node)]
            for qualified, member in members:
                doc = ast.get_docstring(member)
                if doc:
                    found[f"{module_name}.{qualified}"] = doc
    return tuple(sorted(found.items()))


def _public_definitions(
    parent: ast.Module | ast.ClassDef,
) -> list[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return [node for node in parent.body if isinstance(node, kinds) and not node.name.startswith("_")]


def token_counts(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


def short_documents(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """Docstrings of 30 to 500 tokens: passages of the size a RAG retriever returns."""
    entries = docstrings()
    low, high = SHORT_TOKENS
    counts = token_counts(tokenizer, [doc for _, doc in entries])
    return [entry for entry, count in zip(entries, counts, strict=True) if low <= count <= high]


def long_documents(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """All docstrings in name order, headed by their names, cut into pieces of
    LONG_TOKENS tokens; each piece is named after a function it documents."""
    entries = docstrings()
    text = "\n\n".join(f"{name}\n{doc}" for name, doc in entries)
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    starts = [offsets[i][0] for i in range(0, len(offsets), LONG_TOKENS)]
    pieces = [text[begin:end] for begin, end in itertools.pairwise(starts)]  # the short tail is dropped
    names = [name for name, _ in entries]
    return [(next(n for n in names if n in piece), piece) for piece in pieces if any(n in piece for n in names)]


def build(
    name: str, tokenizer: Tokenizer, requests: int = 0, clients: int = 0, seed: int = 0, documents: int = 0
) -> Workload:
    """Workload `name` (a, b or c), its sizes the spec's unless given: each
    request's query names one document's function; the other documents are
    drawn at random from the same pool."""
    spec = SPECS[name]
    pool = long_documents(tokenizer) if name == "c" else short_documents(tokenizer)
    rng = random.Random(seed)
    drawn = []
    for _ in range(requests or spec.requests):
        chosen = rng.sample(pool, documents or spec.documents)
        query = rng.choice(chosen)[0]
        drawn.append(Request(query, tuple(doc for _, doc in chosen)))
    return Workload(name, spec.description, tuple(drawn), clients or spec.clients)

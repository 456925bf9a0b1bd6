"""Write the settings table of docs/operating.md from service.settings.Settings.

    python scripts/settings_table.py          # rewrite the table between the markers
    python scripts/settings_table.py --check  # exit 1 if the committed table differs

`make docs` runs the first; tests/test_docs.py fails when the committed table
has drifted from the code. Each row is one field of the Settings dataclass: its
flag (none for env-only settings), its RERANKER_* variable, its default and its
metadata["help"], with metadata["choices"] added when the help does not already
name every choice. The group rows ("Batching", "Security", ...) are the comment
lines written above the fields in the class's source.

To change what the table says, change service/settings.py and run `make docs`;
the explanations of when to change a setting are prose next to the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere, installed or not
    sys.path.insert(0, str(ROOT))

from service.settings import ENV_PREFIX, Settings  # noqa: E402

OPERATING = ROOT / "docs" / "operating.md"
START = "<!-- settings:start -->"
END = "<!-- settings:end -->"
NOTE = "<!-- generated from service/settings.py by scripts/settings_table.py (make docs): do not edit by hand -->"

_FIELD = re.compile(r"^    (\w+)\s*:")
_GROUP = re.compile(r"^    #\s*(.+?)\s*$")


def groups() -> dict[str, str]:
    """Field name -> the comment line that opens its group in the class's source."""
    found, pending = {}, None
    for line in inspect.getsource(Settings).splitlines():
        if match := _GROUP.match(line):
            pending = match.group(1)
        elif (match := _FIELD.match(line)) and pending is not None:
            found[match.group(1)] = pending
            pending = None
    return found


def _default(value: object) -> str:
    if isinstance(value, tuple):
        return ", ".join(f"`{item}`" for item in value) or "none"
    if value == "":
        return '`""`'
    return f"`{value}`"


def _meaning(spec: dataclasses.Field) -> str:
    text = spec.metadata["help"].strip()
    choices = spec.metadata.get("choices")
    if choices and not all(choice in text for choice in choices):
        text += " (choices: " + ", ".join(f"`{choice}`" for choice in choices) + ")"
    return text.replace("|", "\\|")


def table() -> str:
    """The Markdown table, one row per setting, with a bold row per group."""
    lines = [
        "| Flag | Environment variable | Default | Meaning |",
        "|---|---|---|---|",
    ]
    group_of = groups()
    for spec in dataclasses.fields(Settings):
        if spec.name in group_of:
            lines.append(f"| **{group_of[spec.name]}** | | | |")
        env_only = spec.metadata.get("env_only", False)
        flag = "(environment only)" if env_only else f"`--{spec.name.replace('_', '-')}`"
        variable = f"`{ENV_PREFIX}{spec.name.upper()}`"
        lines.append(f"| {flag} | {variable} | {_default(spec.default)} | {_meaning(spec)} |")
    return "\n".join(lines)


def rewrite(text: str) -> str:
    """`text` (docs/operating.md) with the block between the markers replaced."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{OPERATING.relative_to(ROOT)} must hold {START} once, then {END} once")
    before, rest = text.split(START)
    _, after = rest.split(END)
    return f"{before}{START}\n{NOTE}\n\n{table()}\n\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed table differs; change nothing")
    args = parser.parse_args(argv)
    current = OPERATING.read_text(encoding="utf-8")
    wanted = rewrite(current)
    if current == wanted:
        return 0
    if args.check:
        diff = difflib.unified_diff(
            current.splitlines(keepends=True),
            wanted.splitlines(keepends=True),
            "docs/operating.md (committed)",
            "docs/operating.md (from service/settings.py)",
        )
        sys.stdout.writelines(diff)
        print("the settings table is out of date: run `make docs`", file=sys.stderr)
        return 1
    OPERATING.write_text(wanted, encoding="utf-8")
    print(f"rewrote the settings table in {OPERATING.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fenced code blocks of README.md and docs/, as the doc tests check and run them.

A block is known by its file and its place among that file's fences
(``README.md#9``). A Python block whose first line names a path
(``# tasks/myteam.py``) is a module to save there; any other is a script. A
comment on the line before a fence, ``<!-- snippet: not run: <reason> -->``,
keeps a block that needs more than the integration tier (the team's image,
another host) from being run; it is still checked. Shell blocks are lists of
commands, or, where lines start with ``$ ``, commands each followed by what
it prints.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import ROOT

DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")))
PLACEHOLDER = "/path/to/taskstack"
"""How the docs name the checkout; the checks put the real one in its place."""

_FENCE = re.compile(
    r"^(?:<!-- snippet: not run: (?P<reason>.+?) -->\n)?"
    r"```(?P<lang>[\w-]*)\n(?P<body>.*?)^```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_MODULE = re.compile(r"# (?P<path>[\w/]+\.py)\n")
_SEPARATORS = {";", "&&", "||", "|", "&"}


@dataclass(frozen=True)
class Snippet:
    path: Path
    """The Markdown file, relative to the checkout."""
    index: int
    lang: str
    text: str
    not_run: str | None = None
    """Why the integration tier does not run it, from its marker."""

    @property
    def id(self) -> str:
        return f"{self.path}#{self.index}"

    @property
    def module(self) -> str | None:
        """The path a Python module snippet is saved at (``tasks/myteam.py``), if it names one."""
        match = _MODULE.match(self.text)
        return match["path"] if match else None

    @property
    def printed(self) -> list[str]:
        """What the snippet says it prints: the last word of the comment on each ``print(``
        line (``print(result.get(timeout=30))  # 9592``)."""
        expected = []
        for token in tokenize.generate_tokens(io.StringIO(self.text).readline):
            if token.type == tokenize.COMMENT and token.line.startswith("print("):
                expected.append(token.string.split()[-1])
        return expected


def snippets(*langs: str) -> list[Snippet]:
    """Every fenced block of the docs, or those in ``langs``."""
    found = []
    for path in DOCS:
        for index, match in enumerate(_FENCE.finditer(path.read_text())):
            if not langs or match["lang"] in langs:
                found.append(
                    Snippet(
                        path.relative_to(ROOT),
                        index,
                        match["lang"],
                        match["body"],
                        match["reason"],
                    )
                )
    return found


@dataclass(frozen=True)
class Command:
    """One simple command of a shell snippet, the checkout in place of its placeholder."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """``NAME=value`` words before the command."""
    line: str = ""
    printed: str | None = None
    """What a ``$ `` block shows the line printing."""


def commands(snippet: Snippet) -> list[Command]:
    lines = snippet.text.replace("\\\n", " ").replace(PLACEHOLDER, str(ROOT)).splitlines()
    prompted = any(line.startswith("$ ") for line in lines)
    found: list[Command] = []
    for line in lines:
        if prompted and not line.startswith("$ "):
            if found and line.strip():
                previous = found[-1]
                printed = f"{previous.printed}\n{line}" if previous.printed else line
                found[-1] = Command(previous.argv, previous.env, previous.line, printed)
            continue
        line = line.removeprefix("$ ")
        for words in _split(line):
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                name, _, value = words.pop(0).partition("=")
                env[name] = value
            if words:
                found.append(Command(words, env, line))
    return found


def _split(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    parts: list[list[str]] = [[]]
    for word in lexer:
        if word in _SEPARATORS:
            parts.append([])
        else:
            parts[-1].append(word)
    return [part for part in parts if part]


def checkout_with(snippet: Snippet, dest: Path) -> Path:
    """A copy of the package, the tasks and pyproject.toml in ``dest``, with ``snippet``
    saved at the path it names: the real tree stays untouched."""
    assert snippet.module is not None, f"{snippet.id} names no module path"
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("taskstack", "tasks"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest)
    (dest / snippet.module).write_text(snippet.text)
    return dest

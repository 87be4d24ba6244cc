"""The docs are current and their code works as shown.

The settings table of docs/configuration.md matches :mod:`taskstack.settings`,
and every fenced block of README.md and docs/ (tests/support/snippets.py) is
checked: Python as the project's own code (``ruff format``, ``ruff check``,
``mypy --strict`` with pyproject.toml), a module where the docs save it, in a
copy of the tree; shell commands name programs, files and flags that exist
(each program's own ``--help``, ``docker compose config`` for compose files and
services), and a ``$ `` block prints what it shows; a Dockerfile block is a
Dockerfile of the repository. tests/integration/test_docs.py runs the Python
against real workers.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT, UNSET, require
from tests.support.snippets import Command, Snippet, checkout_with, commands, snippets

BIN = Path(sys.executable).parent
SHELL = ("console", "bash", "sh", "shell")
PYTHON = snippets("python")
SCRIPTS = [snippet for snippet in PYTHON if snippet.module is None]
MODULES = [snippet for snippet in PYTHON if snippet.module is not None]
BUILTINS = {"set", ".", "source", "cd", "export"}
ENTRIES = {path.name for path in ROOT.iterdir()} | {".env"}
"""A word whose first part is one of these is a path into the checkout."""


def ids(snippet: Snippet) -> str:
    return snippet.id


def run(
    argv: list[str | Path], cwd: Path = ROOT, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in argv],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_settings_table_matches_taskstack_settings() -> None:
    check = run([sys.executable, "scripts/settings_table.py", "--check"])
    assert check.returncode == 0, check.stderr


def test_every_block_of_code_has_a_check() -> None:
    checked = {"python", "dockerfile", "yaml", *SHELL}
    # A fence without a language holds a diagram or output, never commands.
    assert [s.id for s in snippets() if s.lang and s.lang not in checked] == []
    assert SCRIPTS and MODULES


# -- Python --------------------------------------------------------------------------------


def stem(snippet: Snippet) -> str:
    return re.sub(r"\W", "_", snippet.id)


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """``mypy --strict`` over every script snippet at once: its errors, by snippet."""
    folder = tmp_path_factory.mktemp("snippets")
    for snippet in SCRIPTS:
        (folder / f"{stem(snippet)}.py").write_text(snippet.text)
    report = run([BIN / "mypy", "--config-file", ROOT / "pyproject.toml", folder])
    assert re.search(f"(in|checked) {len(SCRIPTS)} source files", report.stdout), report.stderr
    errors: dict[str, list[str]] = {stem(snippet): [] for snippet in SCRIPTS}
    for line in report.stdout.splitlines():
        if ": error:" in line:
            errors[Path(line.split(":")[0]).stem].append(line)
    return errors


@pytest.mark.parametrize("snippet", SCRIPTS, ids=ids)
def test_a_python_snippet_is_formatted_lint_clean_and_typed(
    snippet: Snippet, mypy_errors: dict[str, list[str]]
) -> None:
    # Checked as a script of this checkout would be: taskstack is first-party.
    name = f"{stem(snippet)}.py"
    for check in (["format", "--check"], ["check"]):
        done = run([BIN / "ruff", *check, "--stdin-filename", name, "-"], stdin=snippet.text)
        assert done.returncode == 0, f"ruff {check[0]}:\n{done.stdout}{done.stderr}"
    assert mypy_errors[stem(snippet)] == []


@pytest.mark.slow
@pytest.mark.parametrize("snippet", MODULES, ids=ids)
def test_a_task_module_passes_the_checks_where_the_docs_save_it(
    snippet: Snippet, tmp_path: Path
) -> None:
    tree = checkout_with(snippet, tmp_path)
    module = str(snippet.module)
    checks: list[list[str | Path]] = [
        [BIN / "ruff", "format", "--check", module],
        [BIN / "ruff", "check", module],
        [BIN / "mypy", "-p", module.split("/")[0]],  # the package, as pyproject.toml names it
    ]
    for check in checks:
        done = run(check, cwd=tree)
        assert done.returncode == 0, f"{check[1:]}:\n{done.stdout}{done.stderr}"

    # Importing it registers its tasks, under the names it gives them.
    dotted = module.removesuffix(".py").replace("/", ".")
    code = f"import celery, json, {dotted}; print(json.dumps(list(celery.Celery().tasks)))"
    done = run([sys.executable, "-c", code], cwd=tree)
    assert done.returncode == 0, done.stderr
    given = re.findall(r'name="([^"]+)"', snippet.text)
    assert given and set(given) <= set(json.loads(done.stdout))


# -- shell -----------------------------------------------------------------------------------


@functools.cache
def help_text(*argv: str) -> str:
    done = run([*argv, "--help"])
    assert done.returncode == 0, f"{argv} --help: {done.stderr}"
    return done.stdout + done.stderr


def options(text: str) -> dict[str, bool]:
    """The options a ``--help`` lists (argparse, cobra, clap, optparse), and whether each takes
    a value: ``  -f, --file stringArray   Compose files`` gives -f and --file, both True."""
    found: dict[str, bool] = {}
    for match in re.finditer(r"^[ \t]*(-[\w-].*?)(?:[ \t]{2,}|$)", text, re.MULTILINE):
        specs = [spec.replace("=", " ", 1).partition(" ") for spec in match[1].split(", ")]
        # "-f, --file FILE": the value is written once, for the names together.
        takes_value = any(value for _, _, value in specs)
        found |= {name: takes_value for name, _, _ in specs}
    return found


def subcommands(text: str) -> set[str]:
    return set(re.findall(r"^  ([a-z][\w-]*)\*?\s{2,}\S", text, re.MULTILINE))


def help_for(argv: list[str]) -> str:
    """The ``--help`` that lists the options ``argv`` may use."""
    program = argv[0]
    if program in ("scripts/test", ".venv/bin/pytest"):  # scripts/test ends in pytest "$@"
        return help_text(str(BIN / "pytest"))
    if program == "scripts/lock":  # passes its arguments to uv pip compile
        return help_text(str(BIN / "uv"), "pip", "compile")
    if program == "pip":
        return help_text(sys.executable, "-m", "pip", argv[1])
    if Path(program).name.startswith("python") and len(argv) > 1:
        return help_text(sys.executable, argv[1])
    if program.startswith(".venv/bin/taskstack-"):  # an entrypoint: its subcommand's --help
        return help_text(str(ROOT / program), *argv[1:2])
    pytest.fail(f"no --help known for {program}: add it to help_for")


def into_checkout(word: str) -> Path | None:
    """The path ``word`` names in the checkout, if it names one."""
    path = Path(word)
    if path.is_absolute():
        if not path.is_relative_to(ROOT):
            return None
        path = path.relative_to(ROOT)
    if not path.parts or path.parts[0] not in ENTRIES:
        return None
    # A user's .env starts as a copy of .env.example (configuration.md).
    return Path(".env.example") if path == Path(".env") else path


def check_docker(command: Command) -> None:
    """Each subcommand exists, each option is its own; compose files and services too."""
    require(shutil.which("docker") is not None, "the docker CLI with Compose v2")
    level: list[str] = ["docker"]
    files: list[str] = []
    positionals: list[str] = []
    words = iter(command.argv[1:])
    for word in words:
        known = options(help_text(*level))
        if word.startswith("-"):
            name = word.split("=")[0]
            assert name in known, f"{command.line}: `{' '.join(level)}` has no {name}"
            if known[name] and "=" not in word:
                value = next(words)
                if level == ["docker", "compose"] and name in ("-f", "--file"):
                    files.append(value)
        elif not positionals and word in subcommands(help_text(*level)):
            level.append(word)
        else:
            positionals.append(word)
    assert len(level) > 1, f"{command.line}: no docker command"
    if level[:2] == ["docker", "compose"]:
        compose = ["docker", "compose", *[arg for file in files for arg in ("-f", file)]]
        config = run([*compose, "config", "--services"])
        assert config.returncode == 0, f"{command.line}: {config.stderr}"
        assert set(positionals) <= set(config.stdout.split()), command.line


def check(command: Command) -> None:
    program, *args = command.argv
    if program not in BUILTINS:
        found = (
            os.access(ROOT / program, os.X_OK)
            if "/" in program
            else shutil.which(program, path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        )
        assert found, f"{command.line}: no program {program}"
    for word in args:
        path = into_checkout(word)
        assert path is None or (ROOT / path).exists(), f"{command.line}: no {path}"
    if program == "docker":
        check_docker(command)
    elif program not in BUILTINS and any(word.startswith("-") for word in args):
        known = options(help_for(command.argv))
        for word in args:
            assert not word.startswith("-") or word.split("=")[0] in known, command.line


@pytest.mark.parametrize("snippet", snippets(*SHELL), ids=ids)
def test_a_shell_snippet_names_programs_files_and_options_that_exist(snippet: Snippet) -> None:
    found = commands(snippet)
    assert found
    for command in found:
        check(command)
        if command.printed is not None:
            env = {k: v for k, v in os.environ.items() if k not in UNSET}
            shown = subprocess.run(
                ["bash", "-c", command.line],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
                timeout=60,
            )
            assert shown.stdout.strip() == command.printed.strip()


# -- other blocks ----------------------------------------------------------------------------


def instructions(text: str) -> list[str]:
    return [
        line.rstrip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]


@pytest.mark.parametrize("snippet", snippets("dockerfile", "yaml"), ids=ids)
def test_a_dockerfile_or_yaml_snippet_is_what_it_shows(snippet: Snippet) -> None:
    if snippet.lang == "yaml":
        assert list(yaml.safe_load_all(snippet.text))
        return
    # "The Dockerfile's core": every instruction of one of the repository's Dockerfiles.
    dockerfiles = ROOT.glob("*/*/Dockerfile")  # services/python/, examples/own-project/
    shown = instructions(snippet.text)
    assert any(instructions(path.read_text()) == shown for path in dockerfiles)

#!/usr/bin/env python3
"""The settings table of docs/configuration.md, generated from taskstack/settings.py.

Each row is a field of ``Settings``: its variable (``ENV_VARS``), its default,
the docstring under the field, and whether compose.yaml and stack.yaml pass
the variable to the services.

    .venv/bin/python scripts/settings_table.py            # rewrite the table in place
    .venv/bin/python scripts/settings_table.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- settings table: begin -->", "<!-- settings table: end -->"

sys.path.insert(0, str(ROOT))
from taskstack.settings import ENV_VARS, Settings  # noqa: E402


def field_docs() -> dict[str, str]:
    """Each field's docstring: the string statement right after its annotation."""
    tree = ast.parse((ROOT / "taskstack" / "settings.py").read_text())
    (settings,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    docs: dict[str, str] = {}
    for stmt, after in zip(settings.body, settings.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(after.value.value.split()).replace("``", "`")
    return docs


def passed_by(name: str) -> str:
    files = [
        file
        for file in ("compose.yaml", "stack.yaml")
        if any(f" {key}:" in (ROOT / file).read_text() for key in (name, f"{name}_FILE"))
    ]
    if len(files) == 2:
        return "both"
    return files[0] if files else "neither"


def table() -> str:
    docs = field_docs()
    defaults = {field.name: field.default for field in dataclasses.fields(Settings)}
    rows = [
        "| variable | default | meaning | passed by compose.yaml, stack.yaml |",
        "|---|---|---|---|",
    ]
    for field, (name, _) in ENV_VARS.items():
        default = defaults[field]
        shown = ",".join(default) if isinstance(default, tuple) else default
        cell = "unset" if shown is None else f"`{shown}`"
        meaning = docs.get(field, "**no docstring**")
        rows.append(f"| `{name}` | {cell} | {meaning} | {passed_by(name)} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    args = parser.parse_args()
    page = PAGE.read_text()
    head, rest = page.split(BEGIN)
    _, tail = rest.split(END)
    updated = f"{head}{BEGIN}\n{table()}\n{END}{tail}"
    if args.check:
        if updated != page:
            print(f"{PAGE.relative_to(ROOT)}: the settings table is out of date", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())

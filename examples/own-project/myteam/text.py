"""The team's logic, as plain functions: testable without Celery or a worker."""

from __future__ import annotations

from slugify import slugify


def slug(title: str) -> str:
    """A URL-safe ASCII slug of ``title``: ``"Déjà vu, again!"`` -> ``"deja-vu-again"``."""
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    return slugify(title)

"""The compose tier leaves the rest of the Docker engine as it found it.

A bystander project was started before the first compose test
(tests/compose/engine_guard.py); this test runs after every other one.
"""

from __future__ import annotations

import pytest

from tests.compose.engine_guard import EngineGuard

pytestmark = [pytest.mark.compose]


def test_a_project_started_before_the_tier_still_answers_and_the_swarm_state_is_unchanged(
    untouched_engine: EngineGuard,
) -> None:
    untouched_engine.check()

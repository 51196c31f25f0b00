"""Hypothesis settings of the fuzz tests: a short run by default, a long one on demand.

The default run is derandomized (the same examples every time, so that CI fails only when the code
changes) and small enough that every fuzz test together takes well under 40 s. For a real search,
run them with the ``slow`` profile: fifty times the examples, random ones each run:

    MACPACS_FUZZ_PROFILE=slow .venv/bin/python -m pytest tests/fuzz -p no:cacheprovider

Hypothesis' example database is off: the tests must not write into the work tree.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("MACPACS_FUZZ_PROFILE", "macpacs-fuzz")
SLOW_FACTOR = 50

settings.register_profile(
    "macpacs-fuzz",
    deadline=None,
    database=None,
    derandomize=True,
    # The fixtures (an archive, a server) are set up once and only read by the examples.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("slow", parent=settings.get_profile("macpacs-fuzz"), derandomize=False)


def fuzz(examples: int) -> settings:
    """Settings for a test worth ``examples`` examples in a default run."""
    factor = SLOW_FACTOR if PROFILE == "slow" else 1
    return settings(settings.get_profile(PROFILE), max_examples=examples * factor)

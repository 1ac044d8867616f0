"""Fixtures of the sandbox tests: the platform check, and warm pools that are always closed
(the suite's leak guard fails a test that leaves a child or an fd behind)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pytest

from sandbox import Policy, WarmPool

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(autouse=True)
def _linux_only() -> None:
    if sys.platform != "linux":
        pytest.skip("the sandbox needs Linux (seccomp, namespaces, Landlock)")


@pytest.fixture
def pool() -> Iterator[WarmPool]:
    """A warm pool of two python-profile children, closed (children reaped) at the end."""
    with WarmPool(Policy(wall_s=30.0), size=2) as p:
        yield p

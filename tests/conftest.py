"""Shared fixtures: a tiny random-weight checkpoint and a live local swarm serving it."""

from __future__ import annotations

import pytest

from blockswarm.local_swarm import LocalSwarm
from blockswarm.models.random_init import init_random_model

SWARM_SPANS = ("0:3", "2:6", "5:8")  # overlapping: routes use sub-spans of peers


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(init_random_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", family="llama"))


@pytest.fixture(scope="session")
def swarm(tiny_model, tmp_path_factory):
    """A bootstrap node and three peers on loopback, shared by every test that only reads from it."""
    with LocalSwarm(tiny_model, tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers(SWARM_SPANS)
        yield swarm

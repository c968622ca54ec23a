"""The engine tier: ONE real vLLM server with the embedded weights and two tiny LoRA adapters,
kept warm for every test of the protocol surface (tests/support/fleet.py starts it while the
fast tiers run). Its settings: the keys in ``fleet.ENGINE_KEYS``, memory storage, room for
a few requests at once."""

from __future__ import annotations

import openai
import pytest

from tests.support import fleet
from tests.support.browser import browser, page  # noqa: F401 (fixtures: the web console's tests)
from tests.support.servers import Server

SERVED_NAME = fleet.MODEL


@pytest.fixture(scope="session")
def server() -> Server:
    started = fleet.fleet()
    if started.engine is None and started.problem is None:
        started.problem = "the engine tier's server was not started"
    started.ready([started.engine] if started.engine is not None else [])
    assert started.engine is not None
    return started.engine


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return server.client()

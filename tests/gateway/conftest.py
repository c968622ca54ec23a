"""The gateway tier: real `bentoml serve` processes over the scripted engine (``fake://``),
one set of settings per scenario (tests/support/fleet.py has them all)."""

from __future__ import annotations

import openai
import pytest

from tests.support import fleet
from tests.support.browser import browser, page  # noqa: F401 (fixtures: the web console's tests)
from tests.support.redis import RedisServer
from tests.support.servers import Server

SCRIPTED = fleet.SCRIPTED
HI = {"model": SCRIPTED, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
HOLD = {"model": SCRIPTED, "messages": [{"role": "user", "content": "Take your time. [[hold]]"}], "max_tokens": 1000}


@pytest.fixture(scope="session")
def gateway_servers() -> dict[str, Server]:
    started = fleet.fleet()
    started.ready(list(started.gateway.values()))
    return started.gateway


@pytest.fixture(scope="session")
def front(gateway_servers: dict[str, Server]) -> tuple[Server, Server]:
    """Two replicas over one Redis, reading one configuration file; the second lets one
    browser origin in (CORS) and is told by its environment to serve no adapters."""
    return gateway_servers["front-0"], gateway_servers["front-1"]


@pytest.fixture(scope="session")
def server(front: tuple[Server, Server]) -> Server:
    return front[0]


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="session")
def fault_pair(gateway_servers: dict[str, Server]) -> tuple[Server, Server]:
    """Two replicas over a Redis of their own that is down when they start."""
    return gateway_servers["faults-0"], gateway_servers["faults-1"]


@pytest.fixture(scope="session")
def fault_redis(fault_pair: tuple[Server, Server]) -> RedisServer:
    return fleet.fleet().redises["faults"]


@pytest.fixture(scope="session")
def replicas(gateway_servers: dict[str, Server]) -> tuple[Server, Server]:
    """Two replicas with a short request limit: reservations of a killed one free soon."""
    return gateway_servers["replicas-0"], gateway_servers["replicas-1"]


@pytest.fixture(scope="session")
def request_limit(gateway_servers: dict[str, Server]) -> Server:
    """A 2 s request limit."""
    return gateway_servers["request-limit"]


@pytest.fixture(scope="session")
def queue_wait(gateway_servers: dict[str, Server]) -> Server:
    """One slot, one queue place, a 1 s queue limit, a long request limit."""
    return gateway_servers["queue-wait"]


@pytest.fixture(scope="session")
def queue_full(gateway_servers: dict[str, Server]) -> Server:
    """One slot, one queue place, long limits."""
    return gateway_servers["queue-full"]


@pytest.fixture(scope="session")
def mortal(gateway_servers: dict[str, Server]) -> Server:
    """An engine that dies when asked, and starts again when its start gate is open."""
    return gateway_servers["mortal"]


@pytest.fixture
def ledger_pair(gateway_servers: dict[str, Server]) -> tuple[Server, Server]:
    """Two replicas writing one Postgres usage ledger over one Redis; keys include an admin.
    Read from the fleet each time: a test restarts them."""
    return gateway_servers["ledger-0"], gateway_servers["ledger-1"]


@pytest.fixture
def kept(gateway_servers: dict[str, Server]) -> Server:
    """memory:// limits and the default ledger: SQLite in the server's state directory (a
    test restarts it)."""
    return gateway_servers["kept"]

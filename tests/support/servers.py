"""Real `bentoml serve` processes for the e2e tier and the benchmarks: start, wait, read, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]
BENTOML = str(Path(sys.executable).with_name("bentoml"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_share(index: int, shares: int) -> str:
    """This process's CPUs split into ``shares`` disjoint sets, as vLLM's CPU bind list ("0,1").

    vLLM's automatic binding pins every engine on a host to the same cores; two test servers
    would then compile and run on one core while the other idles.
    """
    cpus = sorted(os.sched_getaffinity(0))
    size = max(1, len(cpus) // shares)
    mine = cpus[index * size : (index + 1) * size] or cpus[-size:]
    return ",".join(map(str, mine))


def write_config(path: Path, section: dict[str, Any]) -> None:
    """A BentoML configuration file whose ``services.hermes`` is ``section``."""
    path.write_text(yaml.safe_dump({"services": {"hermes": {"traffic": {"timeout": 3600}, **section}}}))


@dataclass(frozen=True)
class Scrape:
    text: str

    def value(self, name: str, **labels: str) -> float:
        """Sum of a series over the label sets that match ``labels``."""
        total = 0.0
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        for line in self.text.splitlines():
            if line.startswith(name) and line[len(name)] in " {" and all(w in line for w in wanted):
                total += float(line.rsplit(" ", 1)[1])
        return total


@dataclass
class Server:
    url: str
    keys: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes]
    config: Path | None = None
    environment: dict[str, str] = field(default_factory=dict, repr=False)
    ready_path: str = "/readyz"
    gates: Path | None = None
    """The scripted engine's folder of ``[[gate=NAME]]`` files."""
    model_dir: Path | None = None
    """The real engine's weights."""

    def client(self, key: str = "tester", **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[key], max_retries=0, **options)

    def http(self, key: str | None = "tester") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def metrics_text(self) -> str:
        started = time.monotonic()
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        if (took := time.monotonic() - started) > 2:  # shown with a failing test's output
            print(f"slow scrape: /metrics of {self.url} took {took:.1f}s")
        return text

    def scrape(self) -> Scrape:
        """One reading of /metrics, for conditions on several series at one instant."""
        return Scrape(self.metrics_text())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus series from /metrics over the label sets that match ``labels``."""
        return self.scrape().value(name, **labels)

    def idle(self) -> bool:
        """Nothing running or waiting, in the gateway or the engine (one scrape: one instant)."""
        scrape = self.scrape()
        series = (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "hermes_running_requests",
            "hermes_waiting_requests",
        )
        return all(scrape.value(name) == 0 for name in series)

    def open_gate(self, name: str) -> None:
        """Let the scripted engine's answers held at ``[[gate=NAME]]`` go on."""
        assert self.gates is not None, "not a scripted engine"
        (self.gates / name).touch()

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start(
    config: Path,
    workdir: Path,
    keys: dict[str, str],
    *,
    models: Path | None = None,
    cpus: str | None = None,
    environment: dict[str, str] | None = None,
) -> Server:
    """``bentoml serve`` with a BentoML home of its own (sharing the model store ``models``).

    ``bentoml serve`` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts, and
    every server of one home writes its metrics there: two servers of one home would wipe and
    then sum each other's ``/metrics``.
    """
    port = free_port()
    home = workdir / "bentoml"
    home.mkdir(parents=True, exist_ok=True)
    if models is not None and not (home / "models").exists():
        (home / "models").symlink_to(models)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    env.update(
        HERMES_CONFIG=str(config), BENTOML_CONFIG=str(config), BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true"
    )
    if cpus:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    env.update(environment or {})
    log = workdir / "server.log"
    process = subprocess.Popen(
        [BENTOML, "serve", "service:HermesService", "--port", str(port), "--host", "127.0.0.1"],
        cwd=REPO,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Server(f"http://127.0.0.1:{port}", keys, log, process, config, environment or {})


def restart(server: Server, kill: bool = False) -> Server:
    """The same server started again (its configuration, home and state directory) after
    SIGTERM, or after SIGKILL of every one of its processes (no shutdown hook runs)."""
    if kill:
        for process in process_tree(server):
            process.kill()
        server.process.wait(timeout=30)
    else:
        stop(server)
    assert server.config is not None
    workdir = server.log.parent
    models = workdir / "bentoml" / "models"
    again = start(
        server.config,
        workdir,
        server.keys,
        models=models.resolve() if models.is_symlink() else None,
        environment=server.environment,
    )
    again.gates, again.model_dir = server.gates, server.model_dir
    return again


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``condition`` (an observable state: a metric, a status) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


class NotReady(Exception):
    """The server exited, or was not ready in time; the message has its log's tail."""


def wait_ready(server: Server, deadline: float) -> float:
    """Wait for the server's readiness route; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise NotReady(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + server.ready_path, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise NotReady(f"server not ready in time:\n{server.log_tail()}")


def process_tree(server: Server) -> list[psutil.Process]:
    root = psutil.Process(server.process.pid)
    return [root, *root.children(recursive=True)]


def stop(server: Server, timeout_s: float = 60) -> list[int]:
    """SIGTERM as an operator would; returns the pids still alive after ``timeout_s`` (killed)."""
    return stop_all([server], timeout_s)


def stop_all(started: list[Server], timeout_s: float = 60) -> list[int]:
    """SIGTERM to every server at once, then wait for all; returns the pids still alive after
    ``timeout_s`` (killed)."""
    trees: list[psutil.Process] = []
    for server in started:
        try:
            trees += process_tree(server)
        except psutil.NoSuchProcess:
            continue
        server.process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(trees, timeout=timeout_s)
    for process in alive:
        process.kill()
    for server in started:
        server.process.wait(timeout=10)
    return [p.pid for p in alive]

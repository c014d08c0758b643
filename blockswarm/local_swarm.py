"""Start a swarm of local processes (a bootstrap node and peers) for the demo, tests and benchmarks; on loopback, or
each process on a host of its own in an emulated WAN (emulated_wan.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blockswarm.emulated_wan import EmulatedWan

READY_DHT = re.compile(r"blockswarm dht ready: maddrs=(\S+)")
READY_MONITOR = re.compile(r"blockswarm monitor ready: url=(\S+)")
READY_API = re.compile(r"blockswarm api ready: model=(\S+) url=(\S+)")
READY_PEER = re.compile(r"blockswarm peer ready: model=(\S+) blocks=(\d+):(\d+) peer_id=(\S+) maddrs=(.*)")


@dataclass
class LocalProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    maddrs: list[str] = field(default_factory=list)
    peer_id: str | None = None
    span: tuple[int, int] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the process's whole group, as systemd's default stop or `kill -- -PGID` would."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


class LocalSwarm:
    """Owns its processes: `with LocalSwarm(...) as swarm:` stops every one of them on exit. With `wan`, each process
    runs on a new host of that emulated WAN, named after the process; without, all listen on `host`."""

    def __init__(
        self,
        model: str | Path,
        work_dir: str | Path,
        host: str = "127.0.0.1",
        ready_timeout: float = 120,
        wan: EmulatedWan | None = None,
    ):
        self.model = str(model)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.wan = wan
        self.ready_timeout = ready_timeout
        self.processes: list[LocalProcess] = []
        self.bootstrap: LocalProcess | None = None

    @property
    def initial_peers(self) -> list[str]:
        if self.bootstrap is None:
            raise RuntimeError("start the bootstrap node first")
        return self.bootstrap.maddrs

    def start_bootstrap(self) -> LocalProcess:
        process = self._spawn("dht", ["run-dht", "--host", self._address("dht")])
        (maddrs,) = self._wait_ready(process, READY_DHT).groups()
        process.maddrs = maddrs.split(",")
        self.bootstrap = process
        return process

    def start_peer(
        self, *args: str, name: str | None = None, wait: bool = True, test_noise: float = 0.0, nat: bool = False
    ) -> LocalProcess:
        """`args` are extra `run-server` options, e.g. ("--blocks", "0:4"). `test_noise` > 0 starts a peer that lies:
        it adds that much noise (times its outputs' std) to every output, for tests of the clients' spot checks.
        `nat`: on the emulated WAN, the peer's host accepts no inbound connection (the peer finds out at start and
        serves through a relay)."""
        name = name or f"peer{sum(p.name.startswith('peer') for p in self.processes)}"
        command = [
            "run-server",
            self.model,
            "--host",
            self._address(name, nat),
            "--initial-peers",
            *self.initial_peers,
            *args,
        ]
        process = self._spawn(name, command, {"BLOCKSWARM_TEST_NOISE": str(test_noise)} if test_noise else {})
        if wait:
            self.wait_peer(process)
        return process

    def start_peers(self, spans: Sequence[str]) -> list[LocalProcess]:
        """One peer per span ("START:END"), started together; returns them once all are ready."""
        return [self.wait_peer(process) for process in [self.start_peer("--blocks", s, wait=False) for s in spans]]

    def start_monitor(self, port: int = 0, period: float = 5.0) -> str:
        """Start `blockswarm monitor` on this host; returns the URL of its page."""
        command = [
            "monitor",
            "--initial-peers",
            *self.initial_peers,
            "--host",
            self._address("monitor"),
            "--port",
            str(port),
        ]
        process = self._spawn("monitor", [*command, "--period", str(period)])
        return self._wait_ready(process, READY_MONITOR).group(1)

    def start_api(self, *args: str, name: str = "api") -> str:
        """Start `blockswarm serve-api` for this swarm's model on this host (extra `args`: its options); returns the
        API's base URL."""
        command = ["serve-api", self.model, "--initial-peers", *self.initial_peers, "--host", self._address(name)]
        process = self._spawn(name, [*command, "--port", "0", *args])
        return self._wait_ready(process, READY_API).group(2)

    def wait_peer(self, process: LocalProcess) -> LocalProcess:
        match = self._wait_ready(process, READY_PEER)
        process.span = (int(match.group(2)), int(match.group(3)))
        process.peer_id = match.group(4)
        process.maddrs = match.group(5).split()
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _address(self, name: str, nat: bool = False) -> str:
        """Where process `name` listens: a new host of the WAN, or the swarm's one host."""
        if self.wan is None:
            if nat:
                raise ValueError("a NATed peer needs an emulated WAN: LocalSwarm(..., wan=EmulatedWan())")
            return self.host
        return self.wan.add_host(name, nat=nat).ip

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> LocalProcess:
        log_path = self.work_dir / f"{name}.log"
        log = open(log_path, "w")  # noqa: SIM115 - handed to the child process
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        # each process leads a group of its own: signals for the caller's group (Ctrl-C in a terminal) reach only
        # the caller, which stops its swarm in order, and a test can signal one process's whole group
        argv = [sys.executable, "-m", "blockswarm", *args]
        if self.wan is not None:
            argv = self.wan.command(self.wan.hosts[name], argv)
        popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        process = LocalProcess(name, popen, log_path)
        self.processes.append(process)
        return process

    def _wait_ready(self, process: LocalProcess, pattern: re.Pattern) -> re.Match:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            match = pattern.search(process.log())
            if match:
                return match
            if process.popen.poll() is not None:
                raise RuntimeError(
                    f"{process.name} exited with code {process.popen.returncode}:\n{process.log()[-3000:]}"
                )
            time.sleep(0.1)
        raise TimeoutError(f"{process.name} not ready after {self.ready_timeout:.0f} s:\n{process.log()[-3000:]}")


def generate_with_interruptions(
    model, input_ids, max_new_tokens: int, interruptions: dict[int, Callable[[object], None]]
) -> tuple[object, list[float]]:
    """Greedy `model.generate` where `interruptions[k](session)` runs right before remote step k (0 = prefill),
    e.g. to kill the peer serving a span; returns the tokens and the duration of every remote step."""
    original = model.remote.step
    durations: list[float] = []

    def step(session, hidden):
        if len(durations) in interruptions:
            interruptions[len(durations)](session)
        began = time.perf_counter()
        try:
            return original(session, hidden)
        finally:
            durations.append(time.perf_counter() - began)

    model.remote.step = step
    try:
        return model.generate(input_ids, max_new_tokens=max_new_tokens), durations
    finally:
        del model.remote.step

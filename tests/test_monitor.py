"""The swarm monitor against a live loopback swarm: JSON state, reachability, metrics, and the page in Chromium."""

from __future__ import annotations

import html
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest
from browser import HEADLESS_FLAGS, chromium_binary
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from blockswarm.dht import (
    ModelInfo,
    PeerReport,
    ReportReason,
    ServerInfo,
    ServerState,
    make_validators,
    report_peer,
)
from blockswarm.local_swarm import LocalSwarm
from blockswarm.models import load_blocks
from blockswarm.monitor import start_monitor
from blockswarm.monitor.metrics import metrics_registry
from blockswarm.monitor.page import render_page
from blockswarm.monitor.state import History, Reachability, Snapshot, model_state

PERIOD = 1.0
INFO_TIMEOUT = 2.0
OTHER_MODEL = "other-model"  # served only on blocks 0:4 of 8, so it is broken from the start


@pytest.fixture(scope="module")
def monitored(tiny_model, tmp_path_factory):
    """Own swarm (its peers get killed): the tiny model on 0:5 + 3:8, and OTHER_MODEL on 0:4 only."""
    with LocalSwarm(tiny_model, tmp_path_factory.mktemp("monitored")) as swarm:
        swarm.start_bootstrap()
        peers = [
            swarm.start_peer("--blocks", "0:5", "--public-name", "alice's laptop", name="low", wait=False),
            swarm.start_peer("--blocks", "3:8", name="high", wait=False),
            swarm.start_peer("--blocks", "0:4", "--model-name", OTHER_MODEL, name="other", wait=False),
        ]
        for peer in peers:
            swarm.wait_peer(peer)
        monitor = start_monitor(swarm.initial_peers, "127.0.0.1", 0, period=PERIOD, info_timeout=INFO_TIMEOUT)
        monitor.web.start_in_thread()
        try:
            wait_for_state(monitor.url, lambda s: sum(p["reachable"] is True for p in all_peers(s)) == 3)
            yield swarm, monitor
        finally:
            monitor.stop()


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def state(url: str) -> dict:
    status, body = fetch(url + "api/v1/state")
    assert status == 200
    return json.loads(body)


def all_peers(payload: dict) -> list[dict]:
    snapshot = payload["snapshot"] or {"models": []}
    return [peer for model in snapshot["models"] for peer in model["peers"]]


def models(payload: dict) -> dict[str, dict]:
    return {model["name"]: model for model in payload["snapshot"]["models"]}


def wait_for_state(url: str, predicate, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        payload = state(url)
        if payload["snapshot"] is not None and predicate(payload):
            return payload
        assert time.monotonic() < deadline, f"state never matched:\n{json.dumps(payload, indent=1)[:4000]}"
        time.sleep(0.2)


def peer_entry(payload: dict, process) -> dict:
    return next(peer for peer in all_peers(payload) if peer["peer_id"] == process.peer_id)


def by_name(swarm: LocalSwarm, name: str):
    return next(process for process in swarm.processes if process.name == name)


def metric_families(snapshot: Snapshot | None) -> dict:
    """What `/metrics` would serve with `snapshot` as the latest crawl (None: before the first one)."""
    history = History()
    if snapshot is not None:
        history.add(snapshot)
    text = generate_latest(metrics_registry(history)).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_before_the_first_crawl_page_and_metrics_render():
    assert "first crawl" in render_page(None, {}, period=30)
    families = metric_families(None)
    assert "blockswarm_blocks_covered" in families and not families["blockswarm_blocks_covered"].samples


def test_state_lists_every_peer_with_its_span_and_state(monitored):
    swarm, monitor = monitored
    payload = state(monitor.url)
    found = models(payload)
    assert len(found) == 2 and OTHER_MODEL in found
    (tiny_name,) = set(found) - {OTHER_MODEL}
    tiny, other = found[tiny_name], found[OTHER_MODEL]

    assert tiny["num_blocks"] == 8 and tiny["healthy"] and tiny["covered_blocks"] == 8
    assert [block["peers"] for block in tiny["blocks"]] == [1, 1, 1, 2, 2, 1, 1, 1]
    spans = {peer["peer_id"]: (peer["start"], peer["end"]) for peer in tiny["peers"]}
    assert spans == {by_name(swarm, "low").peer_id: (0, 5), by_name(swarm, "high").peer_id: (3, 8)}
    low = peer_entry(payload, by_name(swarm, "low"))
    assert low["public_name"] == "alice's laptop" and low["short_id"].endswith(low["peer_id"][-6:])
    assert low["dtype"] == "float32" and low["cache_tokens_left"] > 0
    (block,) = load_blocks(swarm.model, 0, 1, progress=False)
    assert low["memory_per_block"] == 4 * sum(parameter.numel() for parameter in block.parameters())  # fp32
    for peer in all_peers(payload):
        assert peer["state"] == "online" and peer["reachable"] is True and peer["rtt_ms"] >= 0

    assert not other["healthy"] and other["covered_blocks"] == 4
    assert [block["peers"] for block in other["blocks"]] == [1] * 4 + [0] * 4
    assert other["min_throughput"] == 0
    assert [peer["peer_id"] for peer in other["peers"]] == [by_name(swarm, "other").peer_id]
    assert set(payload["history"]) == set(found) and payload["period"] == PERIOD


def test_is_reachable(monitored):
    swarm, monitor = monitored
    peer_id = by_name(swarm, "low").peer_id
    status, body = fetch(f"{monitor.url}api/v1/is_reachable/{peer_id}")
    assert status == 200 and json.loads(body)["reachable"] is True

    stranger = PeerID.from_base58("QmZhqN2PH7SSEt6nMdPFZS7QYCc4cw9TahxztS58JoVRiY")  # nobody here runs this id
    began = time.monotonic()
    status, body = fetch(f"{monitor.url}api/v1/is_reachable/{stranger.to_base58()}")
    assert status == 200 and json.loads(body)["reachable"] is False and json.loads(body)["error"]
    assert time.monotonic() - began < INFO_TIMEOUT + 5

    status, body = fetch(f"{monitor.url}api/v1/is_reachable/not-a-peer-id")
    assert status == 400 and "peer id" in json.loads(body)["error"]
    assert fetch(monitor.url + "nothing/here")[0] == 404


def test_metrics_parse_as_prometheus_text(monitored):
    _, monitor = monitored
    status, text = fetch(monitor.url + "metrics")
    assert status == 200
    assert "# HELP blockswarm_blocks_covered " in text and "# TYPE blockswarm_blocks_covered gauge" in text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for family in families.values():
        assert family.documentation and family.type == "gauge"

    def value(name: str, **labels) -> float:
        return next(s.value for s in families[name].samples if all(s.labels[k] == v for k, v in labels.items()))

    assert value("blockswarm_blocks_covered", model=OTHER_MODEL) == 4
    assert value("blockswarm_model_healthy", model=OTHER_MODEL) == 0
    assert value("blockswarm_block_throughput_min", model=OTHER_MODEL) == 0
    assert value("blockswarm_block_throughput_avg", model=OTHER_MODEL) > 0
    assert value("blockswarm_peers", model=OTHER_MODEL, state="online") == 1
    assert value("blockswarm_peers", model=OTHER_MODEL, state="unreachable") == 0
    assert sum(s.value for s in families["blockswarm_peers"].samples) == 3
    assert 0 < value("blockswarm_monitor_crawl_duration_seconds") < 10
    assert value("blockswarm_monitor_crawl_ok") == 1


def test_clients_reports_of_wrong_outputs_are_shown(monitored):
    swarm, monitor = monitored
    high = by_name(swarm, "high")
    model_name = next(name for name in models(state(monitor.url)) if name != OTHER_MODEL)
    reporters = []  # two clients: each its own key (clients in one process would share hivemind's process-wide key)
    for _ in range(2):
        validators, marker = make_validators(RSAPrivateKey())
        reporters.append(
            (DHT(initial_peers=swarm.initial_peers, client_mode=True, record_validators=validators, start=True), marker)
        )
    try:
        report = PeerReport(reason=ReportReason.WRONG_OUTPUT, start=3, end=5, reported_at=time.time())
        for dht, marker in reporters:
            assert report_peer(dht, model_name, PeerID.from_base58(high.peer_id), report, marker, get_dht_time() + 60)
        payload = wait_for_state(monitor.url, lambda s: peer_entry(s, high)["lie_reports"] == 2)
        assert peer_entry(payload, by_name(swarm, "low"))["lie_reports"] == 0
        status, text = fetch(monitor.url + "metrics")
        families = {family.name: family for family in text_string_to_metric_families(text)}
        reported = {s.labels["model"]: s.value for s in families["blockswarm_peers_reported_lying"].samples}
        assert reported == {model_name: 1, OTHER_MODEL: 0}
        assert "reported ×2" in fetch(monitor.url)[1]
    finally:
        for dht, _ in reporters:
            dht.shutdown()


class PageSummary(HTMLParser):
    """Counts coverage cells and peer rows per model section of the rendered DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.red_cells: dict[str, int] = {}
        self._model: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section" and "data-model" in attributes:
            self._model = attributes["data-model"]
            self.cells[self._model] = self.rows[self._model] = self.red_cells[self._model] = 0
        elif self._model and "cell" in (attributes.get("class") or "").split():
            self.cells[self._model] += 1
            self.red_cells[self._model] += attributes.get("data-peers") == "0"
        elif self._model and tag == "tr" and "data-peer-id" in attributes:
            self.rows[self._model] += 1


def run_chromium(tmp_path, *args: str) -> str:
    command = [chromium_binary(), *HEADLESS_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_page_in_headless_chromium(monitored, tmp_path):
    _, monitor = monitored
    dom = run_chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", monitor.url)
    page = PageSummary()
    page.feed(dom)
    assert set(page.cells) == set(models(state(monitor.url)))
    assert all(count == 8 for count in page.cells.values())
    assert page.rows[OTHER_MODEL] == 1 and sum(page.rows.values()) == 3
    assert page.red_cells[OTHER_MODEL] == 4 and sum(page.red_cells.values()) == 4
    assert "Last crawl" in dom, "the page's script did not run"
    assert "Memory / block" in dom and " MiB<" in dom
    assert "broken" in dom and "healthy" in dom and "alice's laptop" in html.unescape(dom)

    for name, size in (("monitor.png", "1280,900"), ("monitor-phone.png", "390,1400")):
        screenshot = tmp_path / name
        run_chromium(tmp_path, f"--screenshot={screenshot}", f"--window-size={size}", "--hide-scrollbars", monitor.url)
        assert screenshot.stat().st_size > 10_000


def test_cli_command_serves_until_sigterm(monitored, tmp_path):
    swarm, _ = monitored
    log = tmp_path / "monitor.log"
    with open(log, "w") as out:
        command = ["monitor", "--initial-peers", *swarm.initial_peers, "--host", "127.0.0.1", "--port", "0"]
        command += ["--period", "1"]
        process = subprocess.Popen([sys.executable, "-m", "blockswarm", *command], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while (match := re.search(r"blockswarm monitor ready: url=(\S+)", log.read_text())) is None:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        payload = wait_for_state(match.group(1), lambda s: len(s["snapshot"]["models"]) == 2)
        assert sum(len(model["peers"]) for model in payload["snapshot"]["models"]) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        process.kill()


def test_killed_peer_turns_unreachable_and_its_blocks_uncovered(monitored):
    swarm, monitor = monitored
    high = by_name(swarm, "high")
    killed_at = time.monotonic()
    high.signal(signal.SIGKILL)
    payload = wait_for_state(monitor.url, lambda s: peer_entry(s, high)["reachable"] is False, timeout=15)
    assert time.monotonic() - killed_at < 2 * PERIOD + INFO_TIMEOUT + 3, "took more than a crawl or two"
    assert peer_entry(payload, high)["error"]
    (tiny,) = (model for name, model in models(payload).items() if name != OTHER_MODEL)
    assert not tiny["healthy"] and tiny["covered_blocks"] == 5
    assert [block["peers"] for block in tiny["blocks"]] == [1] * 5 + [0] * 3

    status, body = fetch(f"{monitor.url}api/v1/is_reachable/{high.peer_id}")
    assert status == 200 and json.loads(body)["reachable"] is False
    families = {family.name: family for family in text_string_to_metric_families(fetch(monitor.url + "metrics")[1])}
    unreachable = [s for s in families["blockswarm_peers"].samples if s.labels["state"] == "unreachable"]
    assert sum(s.value for s in unreachable) == 1


def test_stopped_peer_turns_offline(monitored):
    swarm, monitor = monitored
    other = by_name(swarm, "other")
    other.stop()
    payload = wait_for_state(monitor.url, lambda s: peer_entry(s, other)["state"] == "offline", timeout=15)
    entry = peer_entry(payload, other)
    assert entry["reachable"] is None  # not asked: it said it left
    assert models(payload)[OTHER_MODEL]["covered_blocks"] == 0


def test_announced_load_reaches_the_page_and_metrics():
    peer_id = PeerID.from_base58("QmZhqN2PH7SSEt6nMdPFZS7QYCc4cw9TahxztS58JoVRiY")
    info = ServerInfo(state=ServerState.ONLINE, start=0, end=2, active_sessions=3, queued_requests=5)
    model = ModelInfo(num_blocks=2, family="llama", config_hash="c", weights_hash="w")
    reachable = {peer_id: Reachability(reachable=True, checked_at=time.time(), rtt_ms=1.0)}
    snapshot = Snapshot(
        taken_at=time.time(), crawl_seconds=0.1, models=[model_state("m", model, [{peer_id: info}] * 2, reachable)]
    )
    assert snapshot.models[0].peers[0].active_sessions == 3
    assert "3 / 5" in render_page(snapshot, {}, period=30)
    families = metric_families(snapshot)
    assert [s.value for s in families["blockswarm_active_sessions"].samples] == [3]
    assert [s.value for s in families["blockswarm_queued_requests"].samples] == [5]


def test_relayed_and_direct_peers_are_told_apart():
    relayed, direct = PeerID(b"relayed-peer"), PeerID(b"direct-peer")
    model = ModelInfo(num_blocks=2, family="llama", config_hash="c", weights_hash="w")
    records = {
        relayed: ServerInfo(state=ServerState.ONLINE, start=0, end=2, using_relay=True),
        direct: ServerInfo(state=ServerState.ONLINE, start=0, end=2),
    }
    blocks = [records, records]
    reachable = {p: Reachability(reachable=True, checked_at=time.time(), rtt_ms=1.0) for p in (relayed, direct)}
    snapshot = Snapshot(taken_at=time.time(), crawl_seconds=0.1, models=[model_state("m", model, blocks, reachable)])
    payload = json.loads(snapshot.model_dump_json())
    assert {p["peer_id"]: p["using_relay"] for p in payload["models"][0]["peers"]} == {
        relayed.to_base58(): True,
        direct.to_base58(): False,
    }
    page = render_page(snapshot, {}, period=30)
    for peer_id, connection in ((relayed, ">relay<"), (direct, ">direct<")):
        row = re.search(rf'<tr data-peer-id="{peer_id.to_base58()}".*?</tr>', page).group(0)
        assert connection in row

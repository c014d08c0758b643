"""docker/ without a container engine: the compose file parses and names only commands the CLI accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from blockswarm.cli import build_parser

DOCKER = Path(__file__).resolve().parent.parent / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def dockerfile_instruction(name: str) -> list[str]:
    """The exec-form (JSON array) argument of the last `name` instruction of docker/Dockerfile."""
    lines = re.findall(rf"^{name}\s+(\[.*\])\s*$", (DOCKER / "Dockerfile").read_text(), re.MULTILINE)
    assert lines, f"docker/Dockerfile has no exec-form {name}"
    return json.loads(lines[-1])


def argv(service: dict) -> list[str]:
    entrypoint = service.get("entrypoint", dockerfile_instruction("ENTRYPOINT"))
    command = service.get("command", dockerfile_instruction("CMD"))
    return [str(part) for part in [*entrypoint, *command]]


def parse(args: list[str]):
    assert args[0] == "blockswarm", args
    try:
        return build_parser().parse_args(args[1:])
    except SystemExit as e:
        raise AssertionError(f"`{' '.join(args)}` does not parse: exit code {e.code}") from None


def test_dockerfile_default_command_parses():
    assert dockerfile_instruction("ENTRYPOINT") == ["blockswarm"]
    assert parse(["blockswarm", *dockerfile_instruction("CMD")]).command == "demo"


def test_dockerfile_pins_cpu_torch_and_documents_cuda():
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG TORCH_VERSION=2.13.0" in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu\d+", text)


def test_every_compose_command_exists_in_the_cli(compose):
    commands = {}
    for name, service in compose["services"].items():
        assert service["build"]["dockerfile"] == "docker/Dockerfile", name
        commands[name] = parse(argv(service))
    kinds = sorted(args.command for args in commands.values())
    assert kinds == ["init-model", "monitor", "run-dht", "run-server", "run-server", "serve-api"]


def test_compose_wires_a_private_swarm(compose):
    services = compose["services"]
    by_command = {}
    for name, service in services.items():
        by_command.setdefault(parse(argv(service)).command, []).append((name, service))
    ((init_name, init),) = by_command["init-model"]
    ((dht_name, dht),) = by_command["run-dht"]
    ((_, monitor),) = by_command["monitor"]
    ((_, api),) = by_command["serve-api"]
    init_args, dht_args = parse(argv(init)), parse(argv(dht))
    assert init_args.preset == "tiny" and init["restart"] == "no"

    # the bootstrap node's fixed identity is the peer id everyone else dials
    key_mount = next(v for v in dht["volumes"] if v.endswith(f":{dht_args.identity_path}:ro"))
    key_file = DOCKER / key_mount.split(":")[0]
    expected_peer = PeerID.from_identity(key_file.read_bytes()).to_base58()

    joiners = [service for name, service in by_command["run-server"]] + [monitor, api]
    for service in joiners:
        (maddr,) = parse(argv(service)).initial_peers
        parts = Multiaddr(maddr)
        assert parts["dns"] == dht_name and int(parts["tcp"]) == dht_args.port and parts["p2p"] == expected_peer
        assert service["networks"] == dht["networks"] == ["swarm"]
    assert "swarm" in compose["networks"]

    spans = []
    for _, peer in by_command["run-server"]:
        args = parse(argv(peer))
        assert args.model == init_args.dir and args.host == "0.0.0.0"
        volume = init["volumes"][0].split(":")[0]
        assert f"{volume}:{Path(init_args.dir).parent}:ro" in peer["volumes"] and volume in compose["volumes"]
        assert peer["depends_on"][init_name]["condition"] == "service_completed_successfully"
        spans.append(args.blocks)
    assert {block for start, end in spans for block in range(start, end)} == set(range(8)), "tiny has 8 blocks"

    monitor_args = parse(argv(monitor))
    assert f"{monitor_args.port}:{monitor_args.port}" in monitor["ports"] and monitor_args.host == "0.0.0.0"

    # the API is a client of the peers' model: same checkpoint, same model name
    api_args = parse(argv(api))
    assert f"{api_args.port}:{api_args.port}" in api["ports"] and api_args.host == "0.0.0.0"
    assert api_args.port != monitor_args.port
    assert api_args.model == init_args.dir and f"{volume}:{Path(init_args.dir).parent}:ro" in api["volumes"]
    assert api["depends_on"][init_name]["condition"] == "service_completed_successfully"
    assert {parse(argv(peer)).model_name for _, peer in by_command["run-server"]} == {api_args.model_name}

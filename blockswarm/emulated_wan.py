"""An emulated wide-area network on one machine, for tests and benchmarks: hosts with their own addresses, one-way
delays between them, bandwidth limits, and NAT.

Each host is a network namespace of its own holding one TUN device. A router process, outside every namespace,
holds the other end of all the TUN devices: it reads each IP packet a host sends, holds it for the pair's one-way
delay and for the time its bytes take on the sender's uplink and the receiver's downlink (a token bucket each,
no loss: a full link queues), and writes it to the receiving host's device. A NATed host gets no unsolicited
inbound packet: a TCP SYN without ACK towards it is dropped, and so is UDP from an address it has not sent to.
The kernel's `tc` has no `netem` here, so delays live in user space; a large MTU keeps the packet rate low.

Only the namespaces and devices this module creates are touched, and `close()` (also run at exit) removes them.
Processes run on a host through `EmulatedWan.command(host, argv)` (`ip netns exec`); `LocalSwarm(wan=...)` puts
each process it starts on a host of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import heapq
import ipaddress
import itertools
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MTU = 65000  # bytes; at 1 Gbit/s about 2000 packets a second, which the Python router keeps up with
# Public-looking addresses, as WAN hosts have: libp2p treats private ones (10/8, ...) as a LAN and, among other
# things, never announces an address through a relay at a private address. They exist inside the namespaces only
# (each holds just its TUN device and loopback, with no route elsewhere), so nothing is ever sent to the real ones.
SUBNET = ipaddress.ip_network("11.213.0.0/16")
_WAN_NUMBERS = itertools.count()


@dataclass(frozen=True)
class WanHost:
    name: str
    namespace: str
    ip: str
    nat: bool


class EmulatedWan:
    """`with EmulatedWan(delay_ms=25, bandwidth_mbit=100) as wan:`; add hosts, run processes on them."""

    def __init__(self, delay_ms: float = 0.0, bandwidth_mbit: float | None = None):
        if os.geteuid() != 0:
            raise PermissionError("the emulated WAN creates network namespaces and TUN devices: run it as root")
        self.default_bandwidth_mbit = bandwidth_mbit
        self.hosts: dict[str, WanHost] = {}
        # names of namespaces and devices (at most 15 characters): unique per process and per WAN within it
        self._tag = f"bsw{os.getpid() % 100000}{chr(ord('a') + next(_WAN_NUMBERS) % 26)}"
        self._control, router_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._router = subprocess.Popen(
            [sys.executable, "-m", "blockswarm.emulated_wan", str(router_end.fileno())],
            pass_fds=[router_end.fileno()],
        )
        router_end.close()
        self._send({"op": "delay", "a": None, "b": None, "seconds": delay_ms / 1e3})
        atexit.register(self.close)

    def add_host(self, name: str, bandwidth_mbit: float | None = None, nat: bool = False) -> WanHost:
        """A new host: its namespace, its TUN device with the next address, its link to the router."""
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists already")
        index = len(self.hosts) + 1
        host = WanHost(name, f"{self._tag}-{name}", str(SUBNET.network_address + index), nat)
        bandwidth_mbit = self.default_bandwidth_mbit if bandwidth_mbit is None else bandwidth_mbit
        device = f"{self._tag}t{index}"
        tun = os.open("/dev/net/tun", os.O_RDWR)
        try:
            fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TUN | IFF_NO_PI))
            _ip("netns", "add", host.namespace)
            self.hosts[name] = host  # from here on, close() removes its namespace
            _ip("link", "set", device, "netns", host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "link", "set", device, "mtu", str(MTU), "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.ip}/{SUBNET.prefixlen}", "dev", device)
            rate = None if bandwidth_mbit is None else bandwidth_mbit * 1e6
            self._send({"op": "host", "ip": host.ip, "bits_per_s": rate, "nat": nat}, fd=tun)
        finally:
            os.close(tun)  # the router holds its own copy
        return host

    def set_delay(self, delay_ms: float, a: str | None = None, b: str | None = None) -> None:
        """One-way delay between hosts `a` and `b`, both ways; without them, between all pairs not set apart."""
        ips = (None, None) if a is None else (self.hosts[a].ip, self.hosts[b].ip)
        self._send({"op": "delay", "a": ips[0], "b": ips[1], "seconds": delay_ms / 1e3})

    def set_bandwidth(self, bandwidth_mbit: float | None, name: str | None = None) -> None:
        """Uplink and downlink rate of host `name`, or of every host (None: unlimited)."""
        for host in [self.hosts[name]] if name is not None else list(self.hosts.values()):
            rate = None if bandwidth_mbit is None else bandwidth_mbit * 1e6
            self._send({"op": "rate", "ip": host.ip, "bits_per_s": rate})

    def command(self, host: WanHost, argv: list[str]) -> list[str]:
        """`argv` run on `host`."""
        return ["ip", "netns", "exec", host.namespace, *argv]

    def close(self) -> None:
        """Stop the router (its devices vanish with it) and remove the namespaces."""
        atexit.unregister(self.close)
        if self._router.poll() is None:
            self._control.close()
            try:
                self._router.wait(5)
            except subprocess.TimeoutExpired:
                self._router.kill()
                self._router.wait()
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        self.hosts.clear()

    def __enter__(self) -> EmulatedWan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, message: dict, fd: int | None = None) -> None:
        data = json.dumps(message).encode() + b"\n"
        if fd is None:
            self._control.sendall(data)
        else:
            socket.send_fds(self._control, [data], [fd])
        if self._control.recv(3) != b"ok\n":
            raise RuntimeError(f"the emulated WAN's router refused {message}")


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


# ---------------------------------------------------------------- the router process


@dataclass
class _Link:
    """A host's device and its links' state as the router sees them."""

    fd: int
    bits_per_s: float | None
    nat: bool
    uplink_free_at: float = 0.0
    downlink_free_at: float = 0.0
    contacted: set[bytes] | None = None  # a NATed host: addresses it sent to (their UDP may come back)


class _Router:
    def __init__(self, control: socket.socket):
        self.control = control
        self.links: dict[bytes, _Link] = {}
        self.delays: dict[tuple[bytes, bytes], float] = {}
        self.default_delay = 0.0
        self.queue: list[tuple[float, int, int, bytes]] = []  # (due, order, destination fd, packet)
        self.sent = 0
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ, None)
        self.buffer = b""

    def run(self) -> None:
        while True:
            timeout = max(0.0, self.queue[0][0] - time.monotonic()) if self.queue else None
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    if not self._control_message():
                        return
                else:
                    self._read(key.data)
            now = time.monotonic()
            while self.queue and self.queue[0][0] <= now:
                _, _, fd, packet = heapq.heappop(self.queue)
                with contextlib.suppress(OSError):  # the host's device is gone or full: lost, as on a real link
                    os.write(fd, packet)

    def _control_message(self) -> bool:
        data, fds, _, _ = socket.recv_fds(self.control, 4096, 1)
        if not data:
            return False
        message = json.loads(data)
        if message["op"] == "host":
            (fd,) = fds
            os.set_blocking(fd, False)
            address = socket.inet_aton(message["ip"])
            link = _Link(fd, message["bits_per_s"], message["nat"], contacted=set() if message["nat"] else None)
            self.links[address] = link
            self.selector.register(fd, selectors.EVENT_READ, link)
        elif message["op"] == "rate":
            self.links[socket.inet_aton(message["ip"])].bits_per_s = message["bits_per_s"]
        elif message["a"] is None:
            self.default_delay = message["seconds"]
        else:
            a, b = socket.inet_aton(message["a"]), socket.inet_aton(message["b"])
            self.delays[a, b] = self.delays[b, a] = message["seconds"]
        self.control.sendall(b"ok\n")
        return True

    def _read(self, source: _Link) -> None:
        while True:
            try:
                packet = os.read(source.fd, MTU + 64)
            except BlockingIOError:
                return
            if len(packet) >= 20 and packet[0] >> 4 == 4:  # IPv4; the namespaces speak nothing else to each other
                self._forward(source, packet)

    def _forward(self, source: _Link, packet: bytes) -> None:
        src, dst = packet[12:16], packet[16:20]
        target = self.links.get(dst)
        if target is None or (target.nat and _unsolicited(packet, target)):
            return
        if source.contacted is not None:
            source.contacted.add(dst)
        bits, now = len(packet) * 8, time.monotonic()
        at = now
        if source.bits_per_s:
            at = source.uplink_free_at = max(at, source.uplink_free_at) + bits / source.bits_per_s
        at += self.delays.get((src, dst), self.default_delay)
        if target.bits_per_s:
            at = target.downlink_free_at = max(at, target.downlink_free_at) + bits / target.bits_per_s
        self.sent += 1
        heapq.heappush(self.queue, (at, self.sent, target.fd, packet))


def _unsolicited(packet: bytes, target: _Link) -> bool:
    """A packet a NAT in front of `target` would drop: a new inbound TCP connection, or UDP from a stranger."""
    header = (packet[0] & 0x0F) * 4
    protocol = packet[9]
    if protocol == 6 and len(packet) > header + 13:
        flags = packet[header + 13]
        return bool(flags & 0x02) and not flags & 0x10  # SYN without ACK
    if protocol == 17:
        return packet[12:16] not in target.contacted
    return False


if __name__ == "__main__":
    _Router(socket.socket(fileno=int(sys.argv[1]))).run()

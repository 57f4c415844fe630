"""common.ports.free_port: the rendezvous port of the tests' process pools and bench ranks."""

from __future__ import annotations

import random
import socket

from common.ports import PORT_RANGE, free_port


def test_a_free_port_lies_below_the_ephemeral_range_and_skips_held_ones(monkeypatch) -> None:
    """bind(0) gave ports in Linux's ephemeral range, where any outgoing connection may take the port between the
    check and the rank's bind (a pool that failed to start failed every test of its module)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    port = free_port()
    assert PORT_RANGE[0] <= port < PORT_RANGE[1] < ephemeral_low
    with socket.socket() as held:
        held.bind(("", port))
        held.listen()
        draws = iter([port, port + 1])
        monkeypatch.setattr(random.SystemRandom, "randrange", lambda self, a, b: next(draws))
        assert free_port() == port + 1  # the held port is passed over

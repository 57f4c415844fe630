"""A free TCP port for a local process group's rendezvous (tests' process pools, bench ranks, torchrun tests)."""

from __future__ import annotations

import random
import socket

# Below Linux's ephemeral range (32768-60999), from which every outgoing connection (gloo's pairs, the local Slurm
# daemons, pip) draws its local port, and below the 20000-32767 that Slurm jobs' rendezvous ports come from
# (slurm.job.rendezvous_port); the local cluster's daemons listen on 6817, 17001 and 17002.
PORT_RANGE = (10000, 15000)


def free_port(tries: int = 200) -> int:
    """A port no socket holds now, outside the ephemeral range: one from bind(("", 0)) is in that range, and an
    outgoing connection could take it between this check and the rank that binds it."""
    draw = random.SystemRandom()  # not the seeded global generator: processes seeded alike would collide
    for _ in range(tries):
        port = draw.randrange(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port
    with socket.socket() as s:  # the whole range in use: what the kernel gives
        s.bind(("", 0))
        return int(s.getsockname()[1])

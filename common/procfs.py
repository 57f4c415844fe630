"""Linux's /proc/self/status read without torch (bench.convert's child process measures a converter that
imports none)."""

from __future__ import annotations


def proc_status_mb(*keys: str) -> dict[str, float]:
    """Fields of Linux's /proc/self/status (VmHWM, RssAnon, ...) in MiB; it reports them in kB. VmHWM is this
    process's own peak: getrusage's ru_maxrss carries the parent's peak across fork + exec (a spawned child that
    allocated nothing read the 2 GB its parent had touched)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {key: int(fields[key].split()[0]) / 1024.0 for key in keys}

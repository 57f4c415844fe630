"""Which job trains in a run directory: `<run_dir>/job.json`, written by the launcher when it queues a Slurm
job and again by rank 0 when a job starts (released, its process part, when the run ends), and read at
submission (launch.preflight) and by rank 0 at start (jobs queued without the launcher), so that the same
command submitted twice cannot put two jobs in one run dir (both would write the same step-N checkpoints,
prune each other's, and draw two curves in one TensorBoard run), also while the first still waits in the
queue.

A job counts as still running when Slurm lists it in a live state, or, on the host that ran it, when its
rank-0 process is alive. A run dir whose last job is gone (finished, failed, cancelled) is free: resuming
it is the normal case.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

from common.files import write_json_atomic

OWNER_FILE = "job.json"
# squeue states of a job that holds (or will again hold) its run dir
LIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED"}
    | {"SIGNALING", "STOPPED", "STAGE_OUT", "COMPLETING"}  # COMPLETING: also a requeue on its way, or a last save
)


def record_owner(run_dir: str, slurm_job_id: str) -> None:
    """Rank 0 at start: this job (its Slurm id when it has one) and its process."""
    pid = os.getpid()
    record = {
        "slurm_job_id": slurm_job_id,
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _process_start(pid),  # tells this process from a later one that reuses the pid
        "started_at": time.time(),
        # with the id, tells this job from a later one that reuses its id (a restarted cluster, another cluster)
        "slurm_job_name": os.environ.get("SLURM_JOB_NAME", "") if slurm_job_id else "",
    }
    write_json_atomic(os.path.join(run_dir, OWNER_FILE), record)


def release_owner(run_dir: str) -> None:
    """Rank 0 at the end of its run (finished, stopped or failed): its process no longer holds the run dir (a
    process that goes on, a notebook's or a test's, would otherwise keep it). The Slurm id stays: a job that
    Slurm requeues still holds it. Only this process's own record is changed."""
    record = _read_record(run_dir)
    if record is not None and _is_this_process(record):
        write_json_atomic(os.path.join(run_dir, OWNER_FILE), {**record, "pid": 0, "ended_at": time.time()})


def _read_record(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, OWNER_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_this_process(record: dict) -> bool:
    return record.get("host") == socket.gethostname() and int(record.get("pid") or 0) == os.getpid()


def record_submission(run_dir: str, slurm_job_id: str, since: float, job_name: str = "") -> None:
    """The launcher, right after queueing (at time `since`): the run dir belongs to Slurm job `slurm_job_id` (an
    array task's "<array>_<task>") from now on, while it is pending too; rank 0 replaces the record when the job
    starts, and a record rank 0 already wrote after `since` is kept (it also names the process). No process yet
    (pid 0): where Slurm cannot be asked, the record does not hold the run dir. `job_name`: the name the job was
    queued under (a job that later shows another name under this id is another job)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, OWNER_FILE)
    try:
        with open(path) as f:
            if float(json.load(f).get("started_at", 0)) >= since:
                return
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    record = {
        "slurm_job_id": slurm_job_id,
        "host": socket.gethostname(),
        "pid": 0,
        "submitted_at": time.time(),
        "slurm_job_name": job_name,
    }
    write_json_atomic(path, record)


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); "" when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2 :].split()[19]  # fields after "pid (comm) ": state is field 3


def _slurm_state(job_id: str, timeout_s: float = 30.0) -> tuple[str, str] | None:
    """The job's squeue state and name (state "" when Slurm no longer lists it); None when Slurm cannot be
    asked here."""
    if shutil.which("squeue") is None:
        return None
    try:
        # %i: "<array>_<task>" for an array task (the launcher's record), %A: the task's own job id once it
        # runs (rank 0's record; squeue -j <array id> lists every task of the array); %A of a pending task is
        # the array's id, so only %i names it then
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%i %A %T %j"], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:  # a job Slurm has forgotten: "Invalid job id"; anything else: Slurm did not answer
        return ("", "") if "Invalid job id" in out.stderr else None
    states: dict[str, tuple[str, str]] = {}
    for line in out.stdout.splitlines():
        if len(fields := line.split(" ", 3)) >= 3:
            task, own, state = fields[:3]
            name = fields[3] if len(fields) > 3 else ""  # last: a name may hold spaces
            states.setdefault(task, (state, name))
            if "[" not in task:  # "<array>_[2-7]": tasks not yet split off, %A is the array's id, not theirs
                states.setdefault(own, (state, name))
    return states.get(job_id, ("", ""))


def _process_alive(pid: int, start: str) -> bool:
    """The recorded process is alive: a python process with this pid that started when it did."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            is_python = b"python" in f.read()
    except OSError:
        return False
    return is_python and (not start or _process_start(pid) == start)


def running_owner(run_dir: str) -> str | None:
    """Who still trains in `run_dir` ("Slurm job 123 (RUNNING)", "process 4567 on host"), or None."""
    record = _read_record(run_dir)
    if record is None:
        return None
    same_host = record.get("host") == socket.gethostname()
    pid, start = int(record.get("pid") or 0), str(record.get("pid_start") or "")
    job_id = str(record.get("slurm_job_id") or "")
    if job_id:
        found = _slurm_state(job_id)
        state = None if found is None else found[0]
        recorded_name = str(record.get("slurm_job_name") or "")
        if found is not None and state and recorded_name and found[1] != recorded_name:
            return None  # another job under a reused id (a restarted cluster's ids start again at 1)
        if state is not None and state not in LIVE_STATES:
            return None  # Slurm knows the job is over
        if state == "RUNNING" and same_host and pid and not _process_alive(pid, start):
            return None  # e.g. a local run inside an salloc shell: the allocation lives on, the run does not
        if state is not None:
            return f"Slurm job {job_id} ({state})"
    if same_host and pid and _process_alive(pid, start):
        return f"process {pid} on {record['host']}"
    return None


def _this_jobs_ids() -> set[str]:
    """The names this job goes by in a record: its Slurm job id and, for an array task, "<array>_<task>"
    (what the launcher records while the task is pending)."""
    env = os.environ
    ids = {env.get("SLURM_JOB_ID", "")}
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        ids.add(f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}")
    return ids - {""}


def other_owner(run_dir: str) -> str | None:
    """`running_owner`, unless the record is this job's own (its Slurm id, or this process: a run resumed in
    the same process). Rank 0 asks at start: jobs submitted without the launcher's check (slurm/train.sbatch
    twice, or as an array under one name) would otherwise train in one run dir."""
    record = _read_record(run_dir)
    if record is None or str(record.get("slurm_job_id") or "") in _this_jobs_ids() or _is_this_process(record):
        return None
    return running_owner(run_dir)

#!/bin/bash
# Stop hypermetric's local Slurm cluster started by start.sh (same SLURM_DIR, default <repo>/.slurm-local).
#
# Cancels all jobs, waits for the queue to drain and the job steps to exit, then stops slurmd,
# slurmctld and, last, munged (a job step still completing needs munge: stopping it first once left
# slurmstepd hung with "Munge encode failed"). Only processes whose pids start.sh recorded in
# $SLURM_DIR/pids.* are signalled (plus slurmctld's children and slurmstepd processes whose working
# directory is under $SLURM_DIR: slurmd runs them in its log dir),
# never by name: SIGTERM, then SIGKILL after a grace period. Logs, slurm.conf and env.sh are kept.
# Exits 0 when nothing is running.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
SLURM_DIR=${SLURM_DIR:-$REPO/.slurm-local}
GRACE_S=${SLURM_STOP_GRACE_S:-10}

log() { echo "stop.sh: $*"; }

if [ ! -d "$SLURM_DIR" ]; then log "no $SLURM_DIR: nothing to stop"; exit 0; fi
SLURM_DIR=$(cd "$SLURM_DIR" && pwd)
export SLURM_CONF="$SLURM_DIR/slurm.conf"

# shellcheck source=slurm/cluster/lib.sh
source "$HERE/lib.sh"  # alive PID NAME
# live_pids FILE NAME: the pids listed in FILE that are still NAME
live_pids() { local p; for p in $(cat "$1" 2>/dev/null); do alive "$p" "$2" && echo "$p"; done; return 0; }

# slurmstepd processes of this cluster: their working directory is a node's spool dir under SLURM_DIR
stepd_pids() {
  local d comm cwd
  for d in /proc/[0-9]*; do
    { read -r comm < "$d/comm"; } 2>/dev/null || continue
    [ "$comm" = slurmstepd ] || continue
    cwd=$(readlink "$d/cwd" 2>/dev/null) || continue
    case "$cwd" in "$SLURM_DIR"/*) echo "${d#/proc/}";; esac
  done
  return 0
}

# children_of PID: pids whose parent is PID (slurmctld's slurmscriptd)
children_of() {
  local d st rest
  [ -z "${1:-}" ] && return 0
  for d in /proc/[0-9]*; do
    { read -r st < "$d/stat"; } 2>/dev/null || continue
    st=${st##*) }; rest=${st#* }           # "<state> <ppid> ..." -> "<ppid> ..."
    [ "${rest%% *}" = "$1" ] && echo "${d#/proc/}"
  done
  return 0
}

# stop NAME PIDS...: SIGTERM, wait up to GRACE_S, then SIGKILL
stop_pids() {
  local name=$1; shift
  local pids="" left p
  for p in "$@"; do alive "$p" "$name" && pids="$pids $p"; done
  pids=${pids# }
  [ -z "$pids" ] && return 0
  log "stopping $name (pid $pids)"
  kill $pids 2>/dev/null
  for _ in $(seq $((GRACE_S * 5))); do
    left=""; for p in $pids; do alive "$p" "$name" && left="$left $p"; done
    [ -z "$left" ] && return 0
    sleep 0.2
  done
  log "$name still alive after ${GRACE_S} s: kill -9$left"
  kill -9 $left 2>/dev/null
  for _ in $(seq 25); do
    left=""; for p in $pids; do alive "$p" "$name" && left="$left $p"; done
    [ -z "$left" ] && return 0
    sleep 0.2
  done
  log "ERROR: $name pid$left survived kill -9"
  return 1
}

ctld=$(live_pids "$SLURM_DIR/pids.slurmctld" slurmctld)
slurmds=$(live_pids "$SLURM_DIR/pids.slurmd" slurmd)
munged=$(live_pids "$SLURM_DIR/pids.munged" munged)
if [ -z "$ctld$slurmds$munged$(stepd_pids)" ]; then
  log "nothing running for $SLURM_DIR"
  rm -f "$SLURM_DIR"/pids.*
  exit 0
fi

rc=0
if [ -n "$ctld" ] && [[ "$(scontrol ping 2>/dev/null)" == *UP* ]]; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs $jobs"
    scancel $jobs 2>/dev/null || true
  fi
  for _ in $(seq 150); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  [ -n "$(squeue -h -o %A 2>/dev/null)" ] && log "queue not empty after 30 s: $(squeue -h -o '%A %T' | tr '\n' ' ')"
fi
# job steps finish their epilogue after leaving the queue: let them go while slurmd and munge are up
for _ in $(seq 50); do [ -z "$(stepd_pids)" ] && break; sleep 0.2; done

stop_pids slurmd $slurmds || rc=1
stop_pids slurmstepd $(stepd_pids) || rc=1
ctld_kids=""; for k in $(children_of "$ctld"); do ctld_kids="$ctld_kids $k:$(cat "/proc/$k/comm" 2>/dev/null)"; done
stop_pids slurmctld $ctld || rc=1
for k in $ctld_kids; do stop_pids "${k#*:}" "${k%%:*}" || rc=1; done   # e.g. slurmscriptd, if orphaned
stop_pids munged $munged || rc=1      # munge last

# exited daemons can stay zombies until pid 1 reaps them (~2 s in some containers): wait, so that
# `ps` is clean when this returns (harmless if it is not)
all="$slurmds $ctld $munged"
for _ in $(seq 25); do
  z=""; for p in $all; do [ -e "/proc/$p" ] && z="$z $p"; done
  [ -z "$z" ] && break
  sleep 0.2
done
if [ "$rc" = 0 ]; then
  rm -f "$SLURM_DIR"/pids.*
  log "stopped (logs kept in $SLURM_DIR/log)"
fi
exit "$rc"

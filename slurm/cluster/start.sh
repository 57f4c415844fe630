#!/bin/bash
# Start hypermetric's local Slurm cluster: munged, slurmctld and two slurmd (nodes n1, n2) on this host.
#
#   bash slurm/cluster/start.sh            # state in <repo>/.slurm-local
#   SLURM_DIR=/tmp/x bash slurm/cluster/start.sh
#   eval "$(bash slurm/cluster/start.sh | tail -n 2)"   # or: source "$SLURM_DIR/env.sh"
#
# Idempotent: if the cluster this script started for SLURM_DIR is up, it only prints the env lines.
# Installs Debian's slurmctld slurmd slurm-client munge with apt-get when slurmctld is missing.
# Needs root. Optional: SLURM_NODE_CPUS (default max(4, nproc)), SLURM_NODE_MEM_MB (default 16000).
# The last two lines of stdout are the `export` lines (also written to $SLURM_DIR/env.sh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STOP="$HERE/stop.sh"
export PATH="$PATH:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive

log() { echo "start.sh: $*"; }
die() { echo "start.sh: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (installs packages, runs munged as user munge, slurmd as root)"
SLURM_DIR=${SLURM_DIR:-$REPO/.slurm-local}
case "$SLURM_DIR" in *[[:space:]]*) die "SLURM_DIR '$SLURM_DIR' contains whitespace (slurm.conf cannot hold it)";; esac
mkdir -p "$SLURM_DIR" || die "cannot create SLURM_DIR $SLURM_DIR"
SLURM_DIR=$(cd "$SLURM_DIR" && pwd)
export SLURM_CONF="$SLURM_DIR/slurm.conf"
ENV_LINES="export SLURM_CONF=$SLURM_CONF
export PATH=$SLURM_DIR/bin:\$PATH"

print_env() { printf '%s\n' "$ENV_LINES" > "$SLURM_DIR/env.sh"; printf '%s\n' "$ENV_LINES"; }

# shellcheck source=slurm/cluster/lib.sh
source "$HERE/lib.sh"  # alive PID NAME

# slurmctld answers (no `| grep -q`: with pipefail an early grep exit can fail the pipe)
ctld_up() { [[ "$(scontrol ping 2>/dev/null)" == *UP* ]]; }
# "n1 idle" lines, one per node (sinfo -N repeats a node once per partition)
node_states() { sinfo -h -N -o '%N %T' 2>/dev/null | sort -u; }

# ---- already up? -------------------------------------------------------------------------------
ours_up() {
  local p n=0
  [ -s "$SLURM_DIR/pids.slurmctld" ] && [ -s "$SLURM_DIR/pids.slurmd" ] || return 1
  alive "$(cat "$SLURM_DIR/pids.slurmctld")" slurmctld || return 1
  for p in $(cat "$SLURM_DIR/pids.slurmd"); do alive "$p" slurmd || return 1; n=$((n + 1)); done
  [ "$n" = 2 ] || return 1
  if [ -s "$SLURM_DIR/pids.munged" ]; then alive "$(cat "$SLURM_DIR/pids.munged")" munged || return 1; fi
  command -v scontrol >/dev/null && ctld_up || return 1
  # both nodes responding (no '*' = not responding, not down/drained)
  [ "$(node_states | grep -cE '^n[12] (idle|allocated|mixed|completing)$')" = 2 ]
}
if ours_up; then
  log "cluster already up in $SLURM_DIR; nothing to do"
  print_env
  exit 0
fi
if ls "$SLURM_DIR"/pids.* >/dev/null 2>&1; then
  log "found pid files of an earlier start that is not (fully) up: stopping its leftovers first"
  SLURM_DIR="$SLURM_DIR" bash "$STOP" || die "stop.sh could not clean up the earlier start in $SLURM_DIR"
fi

# ---- install ------------------------------------------------------------------------------------
mkdir -p "$SLURM_DIR"/{state,log,spool/n1,spool/n2,bin}
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
  log "installing slurmctld slurmd slurm-client munge with apt-get (log: $SLURM_DIR/log/apt.log)"
  t0=$EPOCHREALTIME
  {
    apt-get update -q &&
    apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends slurmctld slurmd slurm-client munge
  } >"$SLURM_DIR/log/apt.log" 2>&1 || { tail -n 20 "$SLURM_DIR/log/apt.log" >&2; die "apt-get install failed (see $SLURM_DIR/log/apt.log)"; }
  log "installed $(slurmctld -V) in $(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $t0}") s"
fi
for prog in slurmctld slurmd sbatch srun squeue sinfo scontrol scancel munge munged; do
  command -v "$prog" >/dev/null || die "'$prog' not found after installing Slurm"
done

# From here on, a failure (set -e or die) tears down whatever this run started.
cleanup_on_error() {
  local rc=$?
  [ "$rc" = 0 ] && return 0
  echo "start.sh: ERROR: start failed (exit $rc); last log lines:" >&2
  tail -n 15 "$SLURM_DIR"/log/slurmctld.log "$SLURM_DIR"/log/slurmd.n*.log >&2 2>/dev/null || true
  echo "start.sh: stopping what this run started" >&2
  SLURM_DIR="$SLURM_DIR" bash "$STOP" >&2 || true
  exit "$rc"
}
trap cleanup_on_error EXIT

# ---- node names ---------------------------------------------------------------------------------
# Jobs rendezvous at their first node's name (as on a real cluster, where node names resolve), so
# n1 and n2 must resolve here too: to the loopback address the daemons listen on.
if ! getent hosts n1 >/dev/null || ! getent hosts n2 >/dev/null; then
  log "adding '127.0.0.1 n1 n2' to /etc/hosts (the local nodes' names)"
  echo "127.0.0.1 n1 n2  # hypermetric local Slurm cluster (slurm/cluster/start.sh)" >> /etc/hosts
fi

# ---- munge --------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
  log "using the munged that is already running (not started here, stop.sh leaves it alone)"
else
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged 2>>"$SLURM_DIR/log/munged.start.log" \
    || runuser -u munge -- munged --force 2>>"$SLURM_DIR/log/munged.start.log" \
    || die "munged did not start (see $SLURM_DIR/log/munged.start.log and /var/log/munge/munged.log)"
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
  alive "$pid" munged || die "munged started but /run/munge/munged.pid has no live munged"
  echo "$pid" > "$SLURM_DIR/pids.munged"
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged (pid $pid) does not answer: munge -n | unmunge fails"
  log "started munged (pid $pid)"
fi

# ---- ports free? --------------------------------------------------------------------------------
for port in 6817 17001 17002; do
  if command -v ss >/dev/null && [ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]; then
    die "TCP port $port is in use (another slurmctld/slurmd?): $(ss -Hltnp "sport = :$port" | tr -s ' ')"
  fi
done

# ---- slurm.conf and the sacct stand-in ----------------------------------------------------------
cpus=${SLURM_NODE_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
mem=${SLURM_NODE_MEM_MB:-16000}
host=$(hostname); host=${host%%.*}
conf=$(<"$HERE/slurm.conf.in")
conf=${conf//@SLURM_DIR@/"$SLURM_DIR"}
conf=${conf//@HOSTNAME@/"$host"}
conf=${conf//@CPUS@/"$cpus"}
conf=${conf//@MEM_MB@/"$mem"}
case "$conf" in *@[A-Z_]*@*) die "unfilled placeholder left in slurm.conf: $(grep -o '@[A-Z_]*@' <<<"$conf" | head -1)";; esac
printf '%s\n' "$conf" > "$SLURM_CONF"

# submitit polls `sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]`; without slurmdbd
# answer from squeue, which knows finished jobs for MinJobAge (300 s).
cat > "$SLURM_DIR/bin/sacct" <<SH
#!/bin/bash
# sacct stand-in for the local cluster (no slurmdbd): JobID|State|NodeList from squeue.
export SLURM_CONF=\${SLURM_CONF:-$SLURM_CONF}
ids=()
while [ \$# -gt 0 ]; do
  case "\$1" in
    -j|--jobs) IFS=, read -ra more <<<"\$2"; ids+=("\${more[@]}"); shift 2;;
    -j*) IFS=, read -ra more <<<"\${1#-j}"; ids+=("\${more[@]}"); shift;;
    --jobs=*) IFS=, read -ra more <<<"\${1#--jobs=}"; ids+=("\${more[@]}"); shift;;
    *) shift;;
  esac
done
echo "JobID|State|NodeList"
for id in "\${ids[@]}"; do squeue -h -t all -j "\$id" -o "%i|%T|%N" 2>/dev/null || true; done
exit 0
SH
chmod +x "$SLURM_DIR/bin/sacct"

# ---- daemons ------------------------------------------------------------------------------------
rm -rf "$SLURM_DIR/state" "$SLURM_DIR/spool"           # fresh cluster: job ids start at 1
mkdir -p "$SLURM_DIR"/{state,spool/n1,spool/n2}
for f in "$SLURM_DIR"/log/slurm*.log; do [ -e "$f" ] && mv -f "$f" "$f.prev"; done
rm -f "$SLURM_DIR"/slurmctld.pid "$SLURM_DIR"/slurmd.*.pid "$SLURM_DIR"/pids.slurm*

# wait_pid FILE NAME: print the pid in FILE once it names a live NAME (5 s)
wait_pid() {
  local pid=""
  for _ in $(seq 50); do
    pid=$(cat "$1" 2>/dev/null || true)
    alive "$pid" "$2" && { echo "$pid"; return 0; }
    sleep 0.1
  done
  echo "start.sh: ERROR: $2 did not come up (no live pid in $1)" >&2
  return 1
}
slurmctld
wait_pid "$SLURM_DIR/slurmctld.pid" slurmctld > "$SLURM_DIR/pids.slurmctld"
for _ in $(seq 100); do ctld_up && break; sleep 0.1; done
ctld_up || die "slurmctld does not answer scontrol ping"
for n in n1 n2; do
  slurmd -N "$n"
  wait_pid "$SLURM_DIR/slurmd.$n.pid" slurmd >> "$SLURM_DIR/pids.slurmd"
done
log "slurmctld pid $(cat "$SLURM_DIR/pids.slurmctld"), slurmd pids $(tr '\n' ' ' < "$SLURM_DIR/pids.slurmd")"

for _ in $(seq 150); do
  [ "$(node_states | grep -cE '^n[12] idle$')" = 2 ] && break
  [[ "$(node_states)" =~ drain|inval ]] && break     # refused by slurmctld: no point waiting
  sleep 0.2
done
if [ "$(node_states | grep -cE '^n[12] idle$')" != 2 ]; then
  sinfo -N -l >&2 || true
  sinfo -R >&2 || true
  die "the nodes did not become idle (node states: $(node_states | tr '\n' ' '))"
fi
trap - EXIT
sinfo
log "cluster up: $SLURM_DIR (logs in $SLURM_DIR/log); env in $SLURM_DIR/env.sh"
print_env

# Helpers shared by start.sh and stop.sh (sourced, not run).

# alive PID NAME: PID is running and is the program NAME (guards against recycled pids). A zombie
# counts as gone: in containers whose pid 1 reaps late, an exited daemon stays one for ~2 s.
alive() {
  local comm st
  [ -n "${1:-}" ] || return 1
  { read -r comm < "/proc/$1/comm" && read -r st < "/proc/$1/stat"; } 2>/dev/null || return 1
  st=${st##*) }
  [ "$comm" = "$2" ] && [ -n "$st" ] && [ "${st:0:1}" != Z ]
}

#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for development and CI.
#
#   sudo scripts/slurm-local.sh up       # install if missing, configure, start, wait until usable
#   sudo scripts/slurm-local.sh status   # daemon states + sinfo; exit 0 iff the cluster is usable
#   sudo scripts/slurm-local.sh down     # stop exactly the daemons `up` started, by PID
#
# Loopback only (127.0.0.1), one node "localhost" advertising 40 CPUs (so that 32+ one-CPU trials run at once), one partition "debug",
# accounting through slurmdbd + MariaDB so that `sacct` (and submitit's job states) work.
# State, spool, logs and pid files live under $SLURM_LOCAL_DIR (default /tmp/slurm-dev).
# Debian 12 packages; no systemd is assumed, so every daemon is started by hand.
# Background and measurements: /work/shared/notes/slurm.md.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-dev}"
STATE_FILE="$DIR/started.pids"    # "name pid" per daemon that THIS script started
WAIT_S="${SLURM_LOCAL_WAIT_S:-60}"  # how long `up` waits for the cluster to become usable
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

# Start order; `down` walks it backwards so munged goes last (a slurmd that loses munge
# hangs on SIGTERM) and MariaDB outlives slurmdbd.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { printf 'slurm-local: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pidfile_of() {
  case "$1" in
    munged)   echo /run/munge/munged.pid ;;
    # mariadbd writes its pid file as the mysql user, so it must live in a mysql-owned dir.
    mariadbd) echo /run/mysqld/mysqld.pid ;;
    *)        echo "$DIR/$1.pid" ;;
  esac
}

# True if $2 is a live (non-zombie) process whose command name is $1: guards against a
# stale pid file whose number has been reused by something else.
is_daemon_pid() {
  local name=$1 pid=$2 state
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/comm && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ "$state" != Z && "$state" != X ]]
}

# Pid of the running daemon according to its pid file, or nothing.
running_pid() {
  local name=$1 f pid
  f=$(pidfile_of "$name")
  [[ -s "$f" ]] || return 0
  pid=$(tr -dc 0-9 <"$f")
  if is_daemon_pid "$name" "$pid"; then echo "$pid"; fi
}

recorded_pid() {
  [[ -f "$STATE_FILE" ]] || return 0
  awk -v n="$1" '$1 == n {print $2}' "$STATE_FILE"
}

record_pid() {  # replace this daemon's line: a restarted daemon has a new pid
  local tmp
  tmp=$(mktemp "$DIR/.pids.XXXXXX")
  if [[ -f "$STATE_FILE" ]]; then awk -v n="$1" '$1 != n' "$STATE_FILE" >"$tmp"; fi
  echo "$1 $2" >>"$tmp"
  mv "$tmp" "$STATE_FILE"
}

forget_pid() {
  [[ -f "$STATE_FILE" ]] || return 0
  local tmp
  tmp=$(mktemp "$DIR/.pids.XXXXXX")
  awk -v n="$1" '$1 != n' "$STATE_FILE" >"$tmp"
  mv "$tmp" "$STATE_FILE"
  [[ -s "$STATE_FILE" ]] || rm -f "$STATE_FILE"
}

logfile_of() {
  case "$1" in
    munged)   echo /var/log/munge/munged.log ;;
    mariadbd) echo "$DIR/log/mariadbd.log" ;;
    *)        echo "$DIR/log/$1.log" ;;
  esac
}

show_logs() {  # tail of every log we know of, for a loud failure
  local name f
  for name in "${DAEMONS[@]}"; do
    for f in "$(logfile_of "$name")" "$DIR/log/$name.out"; do
      if [[ -s "$f" ]]; then
        echo "---- tail $f" >&2
        tail -n 20 "$f" >&2
      fi
    done
  done
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      show_logs
      die "timed out after ${secs}s waiting for $what"
    fi
    sleep 0.2
  done
}

# ---------------------------------------------------------------- install + configure

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Recommends would pull in every plugin plus its -dev packages (hdf5, rocm-smi, ipmi, ...).
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

write_if_changed() {  # write_if_changed PATH MODE < content; returns 0 if the file changed
  local path=$1 mode=$2 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if [[ -f "$path" ]] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    chmod "$mode" "$path"
    return 1
  fi
  install -m "$mode" -o root -g root "$tmp" "$path"
  rm -f "$tmp"
  return 0
}

write_config() {
  mkdir -p /etc/slurm "$DIR/state" "$DIR/spool" "$DIR/log"
  local changed=0
  write_if_changed /etc/slurm/slurm.conf 644 <<EOF && changed=1
# Written by scripts/slurm-local.sh: single-node, loopback-only SLURM for development and CI.
ClusterName=ci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Short credential lifetime: a requeued job otherwise waits cred_expire (120 s) before restarting.
AuthInfo=cred_expire=5
CredType=cred/munge
# The default MailProg does not exist here and slurmctld logs an error for it.
MailProg=/bin/true
# Bind slurmctld and slurmd to 127.0.0.1 only, not to 0.0.0.0.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# linuxproc, not pgid: pgid adds 3 s to the end of every batch job that ran srun (all submitit jobs).
# No cgroup plugins: there is no systemd/cgroup delegation here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Start jobs at once (default batch_sched_delay is 3 s) and rescan often.
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
SelectType=select/cons_tres
# CPUs only: memory is not a consumable resource.
SelectTypeParameters=CR_CPU
# Accounting via slurmdbd, so sacct works; without it submitit sees UNKNOWN states and
# job.result() hangs forever on a job that died without a result.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
# Let the node advertise more CPUs than the hardware has, for real array parallelism.
SlurmdParameters=config_overrides
MaxArraySize=1001
InactiveLimit=0
# Non-default: 5 s (not 30 s) from SIGTERM to SIGKILL for cancelled/timed-out jobs.
KillWait=5
# Non-default: keep finished jobs visible to squeue/scontrol for 300 s.
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=localhost NodeAddr=127.0.0.1 CPUs=40 Boards=1 SocketsPerBoard=1 CoresPerSocket=40 ThreadsPerCore=1 RealMemory=24000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  # Mode 600: slurmdbd refuses a world-readable slurmdbd.conf.
  write_if_changed /etc/slurm/slurmdbd.conf 600 <<EOF && changed=1
# Written by scripts/slurm-local.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/slurmdbd.pid
# root over MariaDB's unix-socket auth: no password and no database setup needed.
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
# Undocumented for slurmdbd but honoured: without it slurmdbd binds 0.0.0.0:6819.
CommunicationParameters=NoInAddrAny
EOF
  if ((changed)) && [[ -n "$(running_pid slurmctld)$(running_pid slurmdbd)$(running_pid slurmd)" ]]; then
    log "WARNING: configuration changed while daemons were running; run 'down' then 'up' to apply it"
  fi
}

# ---------------------------------------------------------------- daemons

start_munged() {
  mkdir -p /run/munge && chown munge:munge /run/munge
  # The munge postinst normally creates the key; recreate it only if something removed it.
  [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
  runuser -u munge -- /usr/sbin/munged </dev/null >"$DIR/log/munged.out" 2>&1
}

start_mariadbd() {
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  # The package's postinst initialises /var/lib/mysql; do it here only if that was skipped.
  if [[ ! -d /var/lib/mysql/mysql ]]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$DIR/log/mariadb-install.out" 2>&1
  fi
  rm -f /run/mysqld/mysqld.sock
  # mariadbd does not daemonise itself: detach it into its own session so that it outlives
  # this script and the caller's process group. No TCP port at all (--skip-networking).
  setsid /usr/sbin/mariadbd --user=mysql --skip-networking \
    --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
    --log-error="$DIR/log/mariadbd.log" </dev/null >"$DIR/log/mariadbd.out" 2>&1 &
  # slurmdbd must find a listening socket, or it gives up.
  wait_for 30 "MariaDB socket /run/mysqld/mysqld.sock" test -S /run/mysqld/mysqld.sock
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_slurmdbd() {
  /usr/sbin/slurmdbd </dev/null >"$DIR/log/slurmdbd.out" 2>&1
  # Up before slurmctld, so that slurmctld registers the cluster at once instead of retrying.
  wait_for 30 "slurmdbd on 127.0.0.1:6819" port_open 6819
}

start_slurmctld() { /usr/sbin/slurmctld </dev/null >"$DIR/log/slurmctld.out" 2>&1; }

# -N: the hostname is not "localhost", and NodeName must not depend on the machine.
start_slurmd() { /usr/sbin/slurmd -N localhost </dev/null >"$DIR/log/slurmd.out" 2>&1; }

has_pid() { [[ -n "$(running_pid "$1")" ]]; }

ensure_running() {
  local name=$1 pid
  pid=$(running_pid "$name")
  if [[ -n "$pid" ]]; then
    log "$name already running (pid $pid)"
    return 0
  fi
  rm -f "$(pidfile_of "$name")"
  "start_$name" || { show_logs; die "could not start $name"; }
  wait_for 30 "$name to write $(pidfile_of "$name")" has_pid "$name"
  pid=$(running_pid "$name")
  record_pid "$name" "$pid"
  log "started $name (pid $pid)"
}

# ---------------------------------------------------------------- health

node_usable() {  # the node answers and can take jobs (a trailing * would mean not responding)
  local st
  # `scontrol ping` fails at once when slurmctld is down; sinfo would retry for ~9 s.
  timeout 5 scontrol ping >/dev/null 2>&1 || return 1
  st=$(timeout 5 sinfo -h -N -n localhost -o %T 2>/dev/null) || return 1
  [[ "$st" =~ ^(idle|mixed|allocated|completing)$ ]]
}

accounting_usable() {  # sacct answers, and slurmctld has registered with slurmdbd
  local out
  out=$(timeout 5 sacct -n -X -S now-1minutes -o JobID 2>&1) || return 1
  [[ "$out" != *"accounting storage is disabled"* ]] || return 1
  out=$(timeout 5 sacctmgr -n -P show cluster ci format=ControlHost 2>/dev/null) || return 1
  [[ -n "$out" ]]
}

cluster_usable() { node_usable && accounting_usable; }

# ---------------------------------------------------------------- commands

cmd_up() {
  local t0=$SECONDS name
  install_packages
  write_config
  for name in "${DAEMONS[@]}"; do ensure_running "$name"; done
  wait_for "$WAIT_S" "the node to be idle in sinfo" node_usable
  wait_for "$WAIT_S" "sacct/slurmdbd to answer" accounting_usable
  log "cluster up in $((SECONDS - t0))s: partition debug, node localhost ($(timeout 5 sinfo -h -o %T))"
}

stop_pid() {  # SIGTERM, wait up to 10 s, then SIGKILL
  local name=$1 pid=$2 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    is_daemon_pid "$name" "$pid" || return 0
    sleep 0.2
  done
  log "WARNING: $name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 25; i++)); do
    is_daemon_pid "$name" "$pid" || return 0
    sleep 0.2
  done
  die "$name (pid $pid) survived SIGKILL"
}

cmd_down() {
  local i name pid
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    name=${DAEMONS[i]}
    pid=$(recorded_pid "$name")
    [[ -n "$pid" ]] || continue
    if is_daemon_pid "$name" "$pid"; then
      log "stopping $name (pid $pid)"
      stop_pid "$name" "$pid"
    else
      log "$name (pid $pid) was no longer running"
    fi
    forget_pid "$name"
  done
  # Steps of jobs still running when slurmd went away are not ours to kill; just say so.
  if pgrep -x slurmstepd >/dev/null 2>&1; then
    log "note: slurmstepd processes of still-running jobs remain: $(pgrep -x slurmstepd | tr '\n' ' ')"
  fi
  log "down"
}

cmd_status() {
  local name pid rec how
  for name in "${DAEMONS[@]}"; do
    pid=$(running_pid "$name")
    rec=$(recorded_pid "$name")
    if [[ -n "$pid" ]]; then
      if [[ "$pid" == "$rec" ]]; then how="started by slurm-local.sh"; else how="not started by slurm-local.sh"; fi
      printf '%-10s running  pid %-8s (%s)\n' "$name" "$pid" "$how"
    else
      printf '%-10s stopped\n' "$name"
    fi
  done
  if timeout 5 scontrol ping >/dev/null 2>&1; then timeout 5 sinfo 2>&1 || true; else echo "sinfo: slurmctld does not answer"; fi
  if cluster_usable; then
    echo "cluster: usable"
  else
    echo "cluster: NOT usable"
    return 1
  fi
}

main() {
  local cmd=${1:-}
  case "$cmd" in
    up | down | status) ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
  esac
  # Installing packages, writing /etc/slurm, and starting daemons as root/munge/mysql all need root.
  [[ $EUID -eq 0 ]] || die "needs root: run 'sudo $0 $cmd'"
  if [[ "$cmd" != status ]]; then mkdir -p "$DIR"; fi
  "cmd_$cmd"
}

main "$@"

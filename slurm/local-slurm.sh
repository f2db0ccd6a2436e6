#!/usr/bin/env bash
# A real single-machine Slurm for tests and demos: munge + slurmctld + slurmd with a config in a
# temp dir. `install` needs root and Debian's packages (what `make slurm` and CI run).
#   slurm/local-slurm.sh install
#   slurm/local-slurm.sh start   -> prints `export SLURM_CONF=...` (source it or eval it)
#   slurm/local-slurm.sh stop
# PDLAUNCH_SLURM_NODES=N (N > 1) starts N fake nodes n1..nN on this host instead (one slurmd each,
# own port, spool and log), so that multi-node allocations (`sbatch -N 3`) can be tested here.
set -euo pipefail
HOST=$(hostname -s)
CPUS=${PDLAUNCH_SLURM_CPUS:-8}
NODES=${PDLAUNCH_SLURM_NODES:-1}
DIR=${PDLAUNCH_SLURM_DIR:-/tmp/pdlaunch-slurm-$NODES}

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge libpmix-dev >/dev/null
}

node_lines() {
  if [ "$NODES" -le 1 ]; then
    echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN"
    echo "PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  else
    echo "NodeName=n[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-$((17000 + NODES)) CPUs=$CPUS State=UNKNOWN"
    echo "PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  fi
}

write_conf() {
  mkdir -p "$DIR"/{state,log} "$DIR/spool/$HOST" "$DIR/tmp/$HOST"
  for i in $(seq 1 "$NODES"); do mkdir -p "$DIR/spool/n$i" "$DIR/tmp/n$i"; done
  cat > "$DIR/slurm.conf" <<CONF
ClusterName=pdlaunch
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
# Slurm's PMIx plugin makes per-step directories under TmpFS: fake nodes on one machine need their own.
TmpFS=$DIR/tmp/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPort=16817
SlurmdPort=16818
$(node_lines)
CONF
}

start() {
  for tool in slurmctld slurmd munged; do
    command -v "$tool" >/dev/null || { echo "local Slurm: $tool is not installed; run \`make slurm\` (slurm/local-slurm.sh install) as root" >&2; exit 2; }
  done
  write_conf
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  export SLURM_CONF=$DIR/slurm.conf
  stop  # a Slurm started earlier may have another node layout
  slurmctld -f "$SLURM_CONF"
  if [ "$NODES" -le 1 ]; then
    slurmd -f "$SLURM_CONF"
  else
    for i in $(seq 1 "$NODES"); do slurmd -f "$SLURM_CONF" -N "n$i"; done
  fi
  for _ in $(seq 1 50); do
    [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" -ge "$NODES" ] \
      && { echo "export SLURM_CONF=$SLURM_CONF"; return; }
    sleep 0.2
  done
  echo "local Slurm did not come up; see $DIR/log" >&2
  exit 1
}

# The daemons this script started, from the PID files their config names (never by process name:
# on a shared machine other users' Slurm daemons must live). Without PDLAUNCH_SLURM_DIR, every node
# layout's directory: a Slurm started with another PDLAUNCH_SLURM_NODES holds the same ports.
pid_files() {
  if [ -n "${PDLAUNCH_SLURM_DIR:-}" ]; then
    compgen -G "$DIR/*.pid" || true
  else
    compgen -G "/tmp/pdlaunch-slurm-*/*.pid" || true
  fi
}

stop() {
  local pids=() file pid
  for file in $(pid_files); do
    pid=$(cat "$file" 2>/dev/null || true)
    # a stale file's PID may belong to another process by now: only a Slurm daemon is ended
    if [ -n "$pid" ] && grep -qxE 'slurmd|slurmctld' "/proc/$pid/comm" 2>/dev/null; then
      kill "$pid" 2>/dev/null && pids+=("$pid")
    fi
    rm -f "$file"
  done
  for _ in $(seq 1 50); do
    local alive=0
    for pid in "${pids[@]}"; do [ -e "/proc/$pid" ] && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac

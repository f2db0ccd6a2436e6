#!/usr/bin/env bash
# A real single-machine Slurm for tests and demos: installs (apt) and starts munge + slurmctld +
# slurmd with a config in a temp dir; `stop` ends them. Needs root and Debian's packages.
#   slurm/local-slurm.sh start   -> prints `export SLURM_CONF=...` (source it or eval it)
#   slurm/local-slurm.sh stop
set -euo pipefail
DIR=${PDLAUNCH_SLURM_DIR:-/tmp/pdlaunch-slurm}
HOST=$(hostname -s)
CPUS=${PDLAUNCH_SLURM_CPUS:-8}

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge libpmix-dev >/dev/null
}

write_conf() {
  mkdir -p "$DIR"/{state,spool,log}
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
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

start() {
  install
  write_conf
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  export SLURM_CONF=$DIR/slurm.conf
  pgrep -x slurmctld >/dev/null || slurmctld -f "$SLURM_CONF"
  pgrep -x slurmd >/dev/null || slurmd -f "$SLURM_CONF"
  for _ in $(seq 1 50); do
    sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && { echo "export SLURM_CONF=$SLURM_CONF"; return; }
    sleep 0.2
  done
  echo "local Slurm did not come up; see $DIR/log" >&2
  exit 1
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

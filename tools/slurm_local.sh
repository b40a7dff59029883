#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine, from Debian packages, without systemd.
#
#   tools/slurm_local.sh start    # install (apt) if needed, configure, start munged, slurmctld, slurmd
#   tools/slurm_local.sh status   # exit 0 when the node answers and is idle/mixed/allocated
#   tools/slurm_local.sh stop     # stop the daemons this script started
#
# Needs root and apt (Debian 12: slurm 22.05). No cgroups and no systemd: Linux process tracking
# (proctrack/linuxproc) and no task plugin; the daemons are started directly. There is no accounting
# database, so `sacct` cannot report job states: run Snakemake with `--slurm-status-command squeue`
# (the conf keeps finished jobs visible to squeue for MinJobAge=600 s), as tests/test_slurm.py does.
set -euo pipefail

CONF_DIR=/etc/slurm
NODE="$(hostname -s)"
CPUS="$(nproc)"
# leave 1 GiB to the system; RealMemory must not exceed what slurmd sees or the node drains
MEM_MB="$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 1024 ))"

log() { echo "slurm_local: $*" >&2; }

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true; }

is_up() {
    command -v sinfo >/dev/null 2>&1 || return 1
    case "$(node_state)" in
        idle*|mixed*|allocated*|completing*) return 0 ;;
        *) return 1 ;;
    esac
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    log "installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
    cat >"$CONF_DIR/slurm.conf" <<CONF
# written by tools/slurm_local.sh: single-node test cluster
ClusterName=te-local
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=main Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    if is_up; then
        log "already running: node $NODE is $(node_state)"
        return 0
    fi
    install_packages
    write_conf
    start_munge
    if ! pid_alive /run/slurm/slurmctld.pid; then
        log "starting slurmctld"
        /usr/sbin/slurmctld
    fi
    if ! pid_alive /run/slurm/slurmd.pid; then
        log "starting slurmd"
        /usr/sbin/slurmd
    fi
    for _ in $(seq 1 60); do
        state="$(node_state)"
        case "$state" in
            idle*|mixed*|allocated*) log "node $NODE is $state"; return 0 ;;
            down*|drain*|unknown*)
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "node $NODE did not come up (state: $(node_state)); see /var/log/slurm/*.log"
    return 1
}

stop() {
    for pidfile in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
        if pid_alive "$pidfile"; then
            kill "$(cat "$pidfile")"
        fi
    done
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) is_up ;;
    *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac

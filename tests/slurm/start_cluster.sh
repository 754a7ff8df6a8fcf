#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests in tests/slurm/ (README, "Running the tests").
#
# Idempotent: does nothing when `sinfo` already answers. Otherwise, as root on Debian/Ubuntu, installs the packages
# if they are missing (slurmctld slurmd slurm-client munge), writes a slurm.conf with this host as the only node,
# and starts munged, slurmctld and slurmd. Where it cannot (not root, no apt-get, a slurm.conf it did not write),
# it says why and exits 0: the SLURM tests then skip with that reason.
set -euo pipefail

MARK="# written by pandallm tests/slurm/start_cluster.sh"
CONF=/etc/slurm/slurm.conf

note() { echo "start_cluster.sh: $*" >&2; }

if command -v sinfo >/dev/null && sinfo -h >/dev/null 2>&1; then
  exit 0  # a cluster answers already
fi
if [ "$(id -u)" != 0 ]; then
  note "not root: no SLURM cluster started; the SLURM tests will be skipped"
  exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
  || ! command -v sbatch >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    note "no apt-get to install SLURM: the SLURM tests will be skipped"
    exit 0
  fi
  note "installing slurmctld slurmd slurm-client munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  note "$CONF exists and was not written by this script; leaving it alone (start that cluster, or the SLURM tests skip)"
  exit 0
fi

# munge authenticates every SLURM message; munged refuses to run as root.
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey --create --force; else create-munge-key -f; fi
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
fi

HOST=$(hostname -s)
CPUS=$(nproc)
MEMORY_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
cat >"$CONF" <<CONF
$MARK
ClusterName=pandallm-test
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
MaxArraySize=1000
NodeName=$HOST CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    note "SLURM cluster up: node $HOST, $CPUS CPUs"
    exit 0
  fi
  sleep 1
done
note "SLURM did not come up; see /var/log/slurm/slurmctld.log and slurmd.log"
sinfo || true
exit 1

#!/usr/bin/env bash
# A real single-node Slurm cluster for the test suite: munge, MariaDB + slurmdbd (accounting, which submitit
# needs to see jobs that Slurm kills), slurmctld and slurmd, all on this machine, no systemd. Run as root.
#   .ci/slurm.sh up     install (apt) if needed, configure, start; returns once the node is idle
#   .ci/slurm.sh down   cancel every job, stop every daemon it started (by pid file)
# Knobs: KD_SLURM_CPUS (CPUs advertised; more than the real count lets small jobs run side by side),
#        KD_SLURM_PARTITION (default "debug").
set -euo pipefail
CPUS=${KD_SLURM_CPUS:-4}
PARTITION=${KD_SLURM_PARTITION:-debug}
NODE=$(hostname -s)
RUN=/run/slurm LOGS=/var/log/slurm CONF=/etc/slurm
say() { echo "[slurm.sh $(date +%T)] $*"; }

wait_until() {  # seconds, what, command...
  local end=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < end )) || { say "timed out waiting for $what"; tail -n 20 "$LOGS"/*.log 2>/dev/null; exit 1; }
    sleep 0.5
  done
}

alive() {  # pidfile, process name
  [[ -s $1 ]] && [[ $(cat "/proc/$(<"$1")/comm" 2>/dev/null) == "$2" ]]
}

stop() {  # pidfile, process name
  alive "$1" "$2" || return 0
  kill "$(<"$1")" 2>/dev/null || true
  for _ in $(seq 40); do alive "$1" "$2" || return 0; sleep 0.5; done
  kill -9 "$(<"$1")" 2>/dev/null || true
}

install_packages() {
  local missing=()
  for p in munge slurm-wlm slurmdbd mariadb-server; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/kd-slurm-apt.log 2>&1 ||
    { apt-get update >>/tmp/kd-slurm-apt.log 2>&1 &&
      apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/kd-slurm-apt.log 2>&1; } ||
    { tail -n 20 /tmp/kd-slurm-apt.log; exit 1; }
}

start_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge
  [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  alive /run/munge/munged.pid munged || runuser -u munge -- /usr/sbin/munged
  wait_until 30 munge bash -c 'munge -n | unmunge'
}

start_accounting() {
  install -d -o mysql -g root -m 0755 /run/mysqld
  [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/tmp/kd-mariadb.log 2>&1
  if ! alive /run/mysqld/mysqld.pid mariadbd; then
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking </dev/null >>"$LOGS/mariadbd.log" 2>&1 &
  fi
  wait_until 60 mariadb mysqladmin ping
  mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'kd-ci';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat >"$CONF/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=kd-ci
StorageLoc=slurm_acct_db
CONF
  chown slurm:slurm "$CONF/slurmdbd.conf" && chmod 0600 "$CONF/slurmdbd.conf"
  alive "$RUN/slurmdbd.pid" slurmdbd || slurmdbd
  wait_until 60 slurmdbd sacctmgr -n show cluster
}

write_slurm_conf() {
  local hw mem
  hw=$(slurmd -C | head -n 1)
  mem=$(( $(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$hw") * 9 / 10 ))
  # DefMemPerCPU: jobs that ask for no memory do not take the whole node; EnforcePartLimits: an impossible
  # request fails at submission instead of pending forever; cred_expire: a requeued job waits this long
  # (default 120 s) before it may start again.
  cat >"$CONF/slurm.conf" <<CONF
ClusterName=kd-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
EnforcePartLimits=ALL
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
  chmod 0644 "$CONF/slurm.conf"
}

node_idle() {
  local state
  state=$(sinfo -h -N -n "$NODE" -o '%T' | head -n 1)
  case $state in
    idle|mixed|allocated) return 0 ;;
    *drain*|down*) scontrol update NodeName="$NODE" State=RESUME || true; return 1 ;;
    *) return 1 ;;
  esac
}

up() {
  local t0=$SECONDS
  install_packages
  getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts
  mkdir -p "$CONF"
  install -d -o slurm -g slurm -m 0755 "$RUN" "$LOGS" /var/spool/slurmctld
  install -d -m 0755 /var/spool/slurmd
  start_munge
  write_slurm_conf  # before slurmdbd: its clients (sacctmgr) read slurm.conf
  start_accounting
  stop "$RUN/slurmd.pid" slurmd
  stop "$RUN/slurmctld.pid" slurmctld
  slurmctld -c  # -c: forget jobs from any earlier cluster on this machine
  wait_until 60 slurmctld bash -c 'scontrol ping | grep -q UP'
  slurmd
  wait_until 60 "node $NODE" node_idle
  say "cluster up in $(( SECONDS - t0 )) s: $(sinfo -h -o '%P %D %c CPUs %T')"
}

down() {
  if alive "$RUN/slurmctld.pid" slurmctld; then
    local jobs
    jobs=$(squeue -h -o %A | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// } ]]; then
      say "cancelling jobs $jobs"
      scancel --full $jobs || true
      for _ in $(seq 60); do [[ -z $(squeue -h -o %A) ]] && break; sleep 0.5; done
    fi
  fi
  stop "$RUN/slurmd.pid" slurmd
  stop "$RUN/slurmctld.pid" slurmctld
  stop "$RUN/slurmdbd.pid" slurmdbd
  stop /run/mysqld/mysqld.pid mariadbd
  stop /run/munge/munged.pid munged
  say "cluster stopped"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Where an association's time goes, seen from DCMTK's echoscu (docs/benchmarks.md, "The association floor").
#
#   bench/association_phases.sh AE_TITLE PORT [RUNS]
#
# Runs echoscu (TCP_NODELAY=1) RUNS times (default 21) under `strace -tt` and prints the medians, in
# ms, of: A-ASSOCIATE-RQ sent -> A-ASSOCIATE-AC in, C-ECHO-RQ sent -> C-ECHO-RSP in, A-RELEASE-RQ
# sent -> A-RELEASE-RP in, and connect -> exit. "In" is the client's next system call after the
# blocking read of the answer's PDU header (strace stamps a call when it starts). Needs strace.
set -euo pipefail
aet=$1 port=$2 runs=${3:-21}
rows=$(for _ in $(seq 1 "$runs"); do
  TCP_NODELAY=1 strace -tt -e trace=connect,write,read,exit_group /usr/bin/echoscu -aec "$aet" 127.0.0.1 "$port" 2>&1 | awk '
    function t(s) { split(s, a, ":"); return a[1] * 3600 + a[2] * 60 + a[3] }
    /connect\(3/ { on = 1; k = 0 }
    on && (/\(3,/ || /exit_group/) { T[k++] = t($1) }
    END { printf "%.2f %.2f %.2f %.2f\n", (T[3] - T[1]) * 1000, (T[7] - T[5]) * 1000, (T[10] - T[8]) * 1000, (T[11] - T[0]) * 1000 }'
done)
middle=$(( (runs + 1) / 2 ))
for column in 1 2 3 4; do
  echo "$rows" | cut -d' ' -f"$column" | sort -n | sed -n "${middle}p"
done | paste -sd' ' | awk '{ printf "RQ->AC %s  C-ECHO %s  release %s  connect->exit %s ms\n", $1, $2, $3, $4 }'

#!/bin/bash
# one queue worker: pops the first line of jobs.txt (under flock) and runs it, until the file is empty
cd /tmp/e28
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/e28
while true; do
  job=$(flock jobs.lock bash -c 'l=$(head -n 1 jobs.txt); [ -n "$l" ] && sed -i 1d jobs.txt; echo "$l"')
  [ -z "$job" ] && break
  name=$(echo "$job" | cut -d'|' -f1); cmd=$(echo "$job" | cut -d'|' -f2-)
  echo "$(date +%T) start $name: $cmd" >> queue.log
  /usr/bin/time -f "%e s %M KB" bash -c "$cmd" > logs/$name.log 2>&1
  echo "$(date +%T) end $name rc=$?" >> queue.log
done

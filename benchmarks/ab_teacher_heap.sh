#!/bin/bash
# teacher-dump, 512 samples in one shard, 2 rounds interleaved, three variants:
#   old   : the batches shortest first (a checkout of 613ce8c, by PYTHONPATH), glibc's defaults
#   plain : longest first (this checkout), glibc's defaults (GEDISTILL_KEEP_HEAP=0)
#   kept  : longest first, the heap kept between batches (this checkout's default, pipeline/teacher/heap.py)
# the dump's own samples/s, wall, peak RSS, the shards compared.
# OLD=<checkout of 613ce8c> WORK=<bench_scaling --work dir> [ROUNDS=2] [VARIANTS="old plain kept"] [LIMIT=512] bash benchmarks/ab_teacher_heap.sh
cd "${WORK:?a bench_scaling work dir with prepared/ and candidates.parquet}"
for round in $(seq 1 ${ROUNDS:-2}); do
 for v in ${VARIANTS:-old plain kept}; do
  rm -rf /tmp/ab_$v
  if [ $v = old ]; then export PYTHONPATH=${OLD:?a checkout of 613ce8c (ascending batches)}; else unset PYTHONPATH; fi
  if [ $v = plain ]; then export GEDISTILL_KEEP_HEAP=0; else unset GEDISTILL_KEEP_HEAP; fi
  l0=$(cut -d' ' -f1 /proc/loadavg); st0=$(awk '/^cpu /{print $9}' /proc/stat)
  /usr/bin/time -f "%e s wall, %U s user, %S s sys, %M KiB maxrss, %R minor faults" env GEDISTILL_NO_PROGRESS=1 /work/main/.venv/bin/python -m stages.cli teacher-dump --prepared prepared --candidates candidates.parquet --out /tmp/ab_$v --limit ${LIMIT:-512} --shard-rows ${LIMIT:-512} --batch-size 16 --threads 2 > /tmp/ab_$v.log 2>&1
  echo "round $round $v: $(grep -o '[0-9.]* samples/s)' /tmp/ab_$v.log | tail -1) $(tail -1 /tmp/ab_$v.log) load $l0, steal $(( $(awk '/^cpu /{print $9}' /proc/stat) - st0 )) ticks | $(grep -o 'heap [a-z].*' /tmp/ab_$v.log | head -1)"
 done
 set -- ${VARIANTS:-old plain kept}; first=$1; shift
 for v in "$@"; do cmp /tmp/ab_$first/part-00000-of-00001.parquet /tmp/ab_$v/part-00000-of-00001.parquet || exit 1; done
 echo "round $round: shards identical"
done

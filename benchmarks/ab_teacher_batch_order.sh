#!/bin/bash
# teacher-dump with the batches shortest first (OLD checkout, by PYTHONPATH) against longest first (this checkout),
# 512 samples in one shard, 2 rounds interleaved; the dump's own samples/s, wall, peak RSS, shards compared.
# OLD=<git worktree of 613ce8c> WORK=<bench_scaling --work dir> bash benchmarks/ab_teacher_batch_order.sh
cd "${WORK:?a bench_scaling work dir with prepared/ and candidates.parquet}"
for round in 1 2; do
 for v in old new; do
  rm -rf /tmp/ab_$v
  if [ $v = old ]; then export PYTHONPATH=${OLD:?a checkout of 613ce8c (ascending batches)}; else unset PYTHONPATH; fi
  l0=$(cut -d' ' -f1 /proc/loadavg)
  /usr/bin/time -f "%e s wall, %M KiB maxrss" env GEDISTILL_NO_PROGRESS=1 /work/main/.venv/bin/python -m stages.cli teacher-dump --prepared prepared --candidates candidates.parquet --out /tmp/ab_$v --limit 512 --shard-rows 512 --batch-size 16 --threads 2 > /tmp/ab_$v.log 2>&1
  echo "round $round $v: $(grep -o '[0-9.]* samples/s)' /tmp/ab_$v.log | tail -1) $(tail -1 /tmp/ab_$v.log) load $l0"
 done
 cmp /tmp/ab_old/part-00000-of-00001.parquet /tmp/ab_new/part-00000-of-00001.parquet && echo "round $round: shards identical"
done

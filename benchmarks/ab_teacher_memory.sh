#!/usr/bin/env bash
# teacher-dump's memory shard by shard, variants side by side in one run (benchmarks/trace_teacher_memory.py).
#   BEFORE=<worktree of an older commit> WORK=<dir with prepared/ and candidates.parquet> \
#   LIMIT=768 SHARD=256 bash benchmarks/ab_teacher_memory.sh
# Variants: before (the BEFORE worktree's code), trim0 (this code, heap trimmed only after each shard),
# trimN (this code, also every TRIM_EVERY batches: its default), cache1024 (this code with the libraries'
# 1024-entry kernel caches). Results: benchmarks/results/ab_teacher_memory_<variant>.json
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${WORK:?a folder with prepared/ and candidates.parquet}
LIMIT=${LIMIT:-768}; SHARD=${SHARD:-256}; VARIANTS=${VARIANTS:-"before trim0 trimN cache1024"}
OUT=${OUT:-$ROOT/benchmarks/results}
for v in $VARIANTS; do
  store=$(mktemp -d)/store
  env=(OMP_NUM_THREADS=2 GEDISTILL_NO_PROGRESS=1); code=$ROOT
  case $v in
    before) code=${BEFORE:?a worktree of the older commit};;
    trim0) env+=(GEDISTILL_TRIM_EVERY=0);;
    trimN) ;;
    cache1024) env+=(ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 LRU_CACHE_CAPACITY=1024);;
    *) echo "unknown variant $v" >&2; exit 2;;
  esac
  echo "== $v ($(date -u +%H:%M:%S), load $(cut -d' ' -f1 /proc/loadavg))"
  (cd "$code" && env "${env[@]}" PYTHONPATH="$code" "$PY" "$ROOT/benchmarks/trace_teacher_memory.py" \
     --json "$OUT/ab_teacher_memory_$v.json" -- --prepared "$WORK/prepared" --candidates "$WORK/candidates.parquet" \
     --out "$store" --limit "$LIMIT" --shard-rows "$SHARD" --batch-size 16 --threads 2 2>/dev/null)
  "$PY" -c "import pyarrow as pa, pyarrow.parquet as pq, glob, hashlib, sys; h = hashlib.sha256()
for f in sorted(glob.glob(sys.argv[1] + '/*.parquet')):
    t = pq.read_table(f, columns=['sample_id', 'h_dec', 'scores', 'ranking']).combine_chunks().replace_schema_metadata(None)
    sink = pa.BufferOutputStream(); w = pa.ipc.new_stream(sink, t.schema); w.write_table(t); w.close()
    h.update(sink.getvalue().to_pybytes())
print('sample_id, h_dec, scores, ranking sha256', h.hexdigest()[:16])" "$store"
  rm -rf "$(dirname "$store")"
done

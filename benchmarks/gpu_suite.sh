#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one run, sized to finish in about 7 minutes on one H200
# (estimates from the H100 rows of BENCHMARKS.md; the slowest parts are model loading, torch.compile
# and dask worker start-up, not the timed loops).
#
#   bash benchmarks/gpu_suite.sh OUT_DIR            # on a GPU machine
#   bash benchmarks/gpu_suite.sh OUT_DIR --tiny     # on the CPU with tiny sizes (or GPU_SUITE_TINY=1):
#                                                     checks the suite runs, measures nothing worth keeping;
#                                                     it leaves out the compiled runs (torch.compile
#                                                     takes minutes on a CPU) and uses the tiny ViT
#                                                     for both embed models
#
# Each benchmark's table is printed and written to OUT_DIR/<name>.txt; a benchmark that fails leaves
# its output (with the error) in OUT_DIR/<name>.txt, the others still run, and the suite exits 1.
# The numbers are whatever the benchmarks measure on this machine, nothing is filled in.
#
# Nothing is installed here: rankpipe and its dependencies (torch, open_clip, zarr, webdataset,
# dask[distributed], scikit-image; optionally zarrs) must already be importable by `python` (set
# PYTHON to use another interpreter). Run it from anywhere; it runs `python -m rankpipe.benchmarks.*`.
#
# Estimated H200 times (from the H100 rows): embed ViT-B-16 with --stages ~90 s, embed
# convnext_large_d_320 ~50 s, train_loop eager + compiled ~80 s, train_throughput eager + compiled
# ~40 s, sweep 16 trials vs 1 ~40 s, embed_workers 1 and 2 dask workers ~80 s, store writer and tar
# reader against the disk ~40 s.
set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_suite.sh OUT_DIR [--tiny]" >&2
    exit 2
fi
OUT=$1
TINY=${GPU_SUITE_TINY:-0}
if [ "${2:-}" = "--tiny" ]; then TINY=1; fi
PY=${PYTHON:-python}
mkdir -p "$OUT"
FAILED=()

# run NAME ARGS...: python -m rankpipe.benchmarks.ARGS, its output printed and kept in OUT/NAME.txt.
run() {
    local name=$1
    shift
    echo "=== $name: python -m rankpipe.benchmarks.$*"
    local start=$SECONDS
    if ! "$PY" -m "rankpipe.benchmarks.$@" 2>&1 | tee "$OUT/$name.txt"; then
        FAILED+=("$name")
    fi
    echo "=== $name: $((SECONDS - start)) s"
}

if [ "$TINY" = 1 ]; then
    DEVICE=cpu
    COMPILED=""
    VIT=rankpipe-tiny-vit
    CONVNEXT=rankpipe-tiny-vit
    EMBED=(--batch-size 16 --images 64 --workers 1 --image-source-size 160x120 --backbone-batches 2)
    CONVNEXT_EMBED=(--batch-size 16 --images 64 --workers 1 --image-source-size 160x120 --backbone-batches 2)
    LOOP=(--images 64 --tokens 4 --token-dim 16 --batch-size 16 --steps 12 --warmup 4)
    STEP=(--d-model 32 --tokens 4 --image-dim 16 --text-tokens 6 --text-dim 16 --relational-tokens 2 --sizes 16
          --warmup 1 --steps 2)
    SWEEP=(--images 64 --tokens 4 --token-dim 16 --trials 2 --concurrency 2 --steps 4 --batch-size 16)
    WORKERS=(--batch-size 16 --images 32 --tars 2 --image-source-size 160x120 --workers-list 1,2)
    WRITE=(--images 24 --tars 2 --batch-size 8)
    READ=(--images 48 --tars 2 --workers 1 --image-source-size 160x120 --repeats 1)
else
    DEVICE=cuda
    COMPILED=reduce-overhead
    VIT=ViT-B-16
    CONVNEXT=convnext_large_d_320
    EMBED=(--batch-size 256 --images 12000 --workers 14 --image-source-size 640x480)
    CONVNEXT_EMBED=(--batch-size 128 --images 8000 --workers 14 --image-source-size 640x480)
    LOOP=(--images 4000 --tokens 100 --token-dim 1536 --batch-size 128 --steps 300 --warmup 50 --full-adapter)
    STEP=(--sizes 128 --no-naive --warmup 5 --steps 30)
    SWEEP=(--images 4000 --tokens 100 --token-dim 1536 --trials 16 --concurrency 16 --steps 150 --full-adapter)
    WORKERS=(--batch-size 256 --images 8000 --tars 8 --image-source-size 640x480 --workers-list 1,2)
    WRITE=(--images 6400 --tars 8 --write-threads 4,8)
    READ=(--images 20000 --tars 16 --workers 14)
fi

# ViT-B-16: pipeline against the backbone alone, and each stage alone (tar reading, GPU decoding,
# store writing), in one run; its "ratio" row is the ViT-B-16 pipeline-vs-backbone measurement.
run embed_vit_b_16 embed_throughput --model "$VIT" --device "$DEVICE" --stages "${EMBED[@]}"
run embed_convnext_large_d_320 embed_throughput --model "$CONVNEXT" --device "$DEVICE" "${CONVNEXT_EMBED[@]}"
# The real training loop (eager, then compiled) against one isolated optimiser step of the same N.
run train_loop train_loop --device "$DEVICE" --modes "off${COMPILED:+,$COMPILED}" "${LOOP[@]}"
run train_step_eager train_throughput --device "$DEVICE" --compile off "${STEP[@]}"
if [ -n "$COMPILED" ]; then
    run train_step_compiled train_throughput --device "$DEVICE" --compile "$COMPILED" "${STEP[@]}"
fi
run sweep_16_vs_1 sweep_throughput --device "$DEVICE" "${SWEEP[@]}"
run embed_workers embed_workers --model "$VIT" --device "$DEVICE" "${WORKERS[@]}"
# The CPU-side I/O of embed on this machine's disk: the store writer and the tar reader against
# plain sequential writes and reads of the same bytes.
run store_write store_write "${WRITE[@]}"
run tar_read tar_read "${READ[@]}"

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed: ${FAILED[*]} (their output is in $OUT)" >&2
    exit 1
fi
echo "all tables written to $OUT"

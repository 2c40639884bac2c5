#!/usr/bin/env bash
# Copy what the GPU campaign has produced so far into $OUT (two tarballs) and print its state.
cd "$(dirname "$0")/../.."
mkdir -p runs
tar czf "$OUT/models.tgz" models/cifar10 2>/dev/null
tar czf "$OUT/results.tgz" benchmarks/results runs/fig3 /tmp/logs --exclude='runs/fig3/models/clean-*' 2>/dev/null
ls -la "$OUT"
echo "--- stages"; cat /tmp/logs/stages.txt 2>/dev/null
for f in /tmp/logs/*.log; do echo "--- $f"; tail -c 400 "$f" | tr '\r' '\n' | tail -3; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

#!/usr/bin/env bash
# Copy everything the campaign (campaign.py) has written so far into $OUT, split into <=15 MB
# pieces (the transfer limit is 16 MiB a file), and print its state.
[ -d /tmp/w ] || { echo "no campaign yet"; exit 0; }
cd /tmp && find w -newer w/.stamp -type f -not -name '*.pyc' -not -path '*/__pycache__/*' > /tmp/snap.lst
tar czf - -T /tmp/snap.lst logs 2>/dev/null | split -b 15M - "$OUT/snap.tgz."
ls -la "$OUT"
tail -n 40 /tmp/logs/campaign.log
for f in /tmp/logs/*.log; do [ "$f" = /tmp/logs/campaign.log ] && continue
  echo "--- $(basename $f): $(tail -c 300 "$f" | tr '\r' '\n' | grep -v '^\s*$' | tail -1)"; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader

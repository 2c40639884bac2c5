#!/usr/bin/env bash
# Copy everything the campaign (campaign.py) has written so far into $OUT, split into <=15 MB
# pieces (the transfer limit is 16 MiB a file), and print its state. A file is taken when it is
# new or differs from the repository the job copies were made from.
[ -d /tmp/w ] || { echo "no campaign yet"; exit 0; }
SRC=$(cd "$(dirname "$0")/../.." && pwd)
cd /tmp && python3 - "$SRC" > /tmp/snap.lst <<'PY'
import filecmp, pathlib, sys
src = pathlib.Path(sys.argv[1])
for job in sorted(pathlib.Path("w").iterdir()):
    for sub in ("benchmarks/results", "models/cifar10", "runs"):
        for f in sorted((job / sub).rglob("*")) if (job / sub).is_dir() else []:
            if f.is_file() and "__pycache__" not in f.parts:
                o = src / f.relative_to(job)
                if not o.is_file() or not filecmp.cmp(f, o, shallow=False):
                    print(f)
PY
tar czf - -T /tmp/snap.lst logs 2>/dev/null | split -b 15M - "$OUT/snap.tgz."
ls -la "$OUT"; wc -l < /tmp/snap.lst
tail -n 12 /tmp/logs/campaign*.log
for f in /tmp/logs/*.log; do case $f in */campaign*) continue;; esac
  echo "--- $(basename $f): $(tail -c 300 "$f" | tr '\r' '\n' | grep -av '^\s*$' | tail -1)"; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader

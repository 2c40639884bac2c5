#!/usr/bin/env bash
# The whole GPU campaign as one dependency graph, run in the background on the remote machine:
#   CIFAR-10 owner models in parallel -> tables (embed) -> Table 2, baselines, persistence;
#   MNIST Figure 3 sweep, baselines and persistence alongside.
# Logs in /tmp/logs; "stage" files in /tmp/logs/*.done mark what finished.
# Every step is resumable (models are reused, sweeps skip finished cells), so rerunning is safe.
set -u
export NNLAUNDER_DATA=${NNLAUNDER_DATA:-/tmp/data} NNLAUNDER_DEVICE=${NNLAUNDER_DEVICE:-cuda}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
L=/tmp/logs; mkdir -p $L
py() { python3 "$@"; }
E="py benchmarks/embed.py --datasets cifar10 --seeds 0,1,2 --threads 2"
mark() { touch $L/$1.done; echo "$(date +%T) $1 done" >> $L/stages.txt; }

# ---- CIFAR-10 models, one process each (the GPU is mostly idle with one small model)
( $E --only clean-resnet20-s0 > $L/clean-resnet20-s0.log 2>&1 && mark clean-resnet20-s0 \
  && $E --only adi-pt > $L/adi-pt.log 2>&1 && mark adi-pt ) &
p1=$!
pids=($p1)
for m in adi-fs zhang-content zhang-noise zhang-unrelated clean-cifar-cnn-s1,clean-resnet20-s1 \
         clean-cifar-cnn-s2,clean-resnet20-s2; do
  ( $E --only $m > $L/$m.log 2>&1 && mark $m ) &
  pids+=($!)
done

# ---- MNIST alongside
( py -m nnlaunder.cli run experiments/paper/fig3-mnist.toml --workspace runs/fig3 --jobs 12 --quiet \
    > $L/fig3.log 2>&1 && py -m nnlaunder.cli report --workspace runs/fig3 --out benchmarks/results/fig3 \
    >> $L/fig3.log 2>&1 && mark fig3 ) &
( py benchmarks/persistence.py --datasets mnist > $L/persistence-mnist.log 2>&1 && mark persistence-mnist ) &
pm=$!

wait "${pids[@]}"
$E > $L/embed-tables.log 2>&1 && mark embed-tables
py benchmarks/table2.py --datasets cifar10 > $L/table2.log 2>&1 && mark table2 &
( py benchmarks/baselines.py --datasets mnist,cifar10 > $L/baselines.log 2>&1 && mark baselines ) &
wait $pm
py benchmarks/persistence.py --datasets cifar10 > $L/persistence-cifar10.log 2>&1 && mark persistence-cifar10
wait
mark all

#!/bin/sh
# Run a benchmark on a frozen copy of the current commit, so edits made while it waits for
# /work/cpu.lock (or runs) do not change what it measures. Usage:
#   benchmarks/snapshot_run.sh NAME PYTHON benchmarks/SCRIPT.py [args...]
set -e
name=$1; shift
py=$1; shift
repo=$(cd "$(dirname "$0")/.." && pwd)
commit=$(git -C "$repo" rev-parse --short HEAD)
snap=/work/bench_tmp/snap-$name-$commit
rm -rf "$snap" && mkdir -p "$snap"
git -C "$repo" archive HEAD src benchmarks | tar -x -C "$snap"
ln -s "$repo/.venv" "$snap/.venv"
cd "$snap"
echo "commit $commit"
"$py" "$@"
status=$?
rm -rf "$snap"
exit $status

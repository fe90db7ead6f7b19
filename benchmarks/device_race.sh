#!/usr/bin/env bash
# Run a long `cggr race` on a leased GPU machine whose commands are limited to ~10 minutes each.
#
#   bash benchmarks/device_race.sh NAME WAIT_SECONDS [cggr race arguments...]
#
# First call: copies src/ to $CGGR_RACE_STATE/cggr-race-NAME/src (CGGR_RACE_STATE defaults to $HOME), so a working
# tree re-synced by later calls cannot change the running code, starts the race detached (setsid) with
# --out/--name/--no-progress filled in, then waits.
# Later calls with the same NAME (arguments after WAIT_SECONDS are then ignored) only wait. Every call waits at
# most WAIT_SECONDS for the race to end, prints the end of its log, and, once the race is over, copies its
# JSON/MD/PNG and log to $OUT (when set) and prints DONE (exit 0); otherwise it prints RUNNING (exit 0), or
# FAILED (exit 1) when the race ended without writing its JSON.
#
# Leases: a machine that is idle for ~30 s after a call is given back, which kills the detached race, so call
# this again at once after each return; a machine held for 30 minutes goes back at the end of the call in
# flight, so the call that spans minute 30 must last until the race ends (4 arms x 10 min do not fit one lease:
# split the arms, each run with its own `standard`, and combine them with `cggr race --merge`).
#
# Example (SmolLM-135M shape, 10 min per arm, a corpus larger than the arms read):
#   bash benchmarks/device_race.sh h200-a 570 --model smollm-135m --minutes 10 --data code+packages \
#       --arms standard,cggr,random
#   bash benchmarks/device_race.sh h200-a 590        # again, immediately, until it prints DONE
#
# Interpreter: $PYTHON when set, else the active virtual environment's ($VIRTUAL_ENV/bin/python), else the first
# `python3` on PATH; it must have torch and the bench extra installed (e.g. PYTHON=/opt/venv/bin/python).
set -u -o pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash benchmarks/device_race.sh NAME WAIT_SECONDS [cggr race arguments...]" >&2
    exit 2
fi
name=$1
wait_s=$2
shift 2
case "$name" in
    *[!A-Za-z0-9._-]*|"") echo "device_race.sh: NAME must be letters, digits, '.', '_' or '-', got '$name'" >&2; exit 2 ;;
esac
case "$wait_s" in
    ''|*[!0-9]*) echo "device_race.sh: WAIT_SECONDS must be a whole number, got '$wait_s'" >&2; exit 2 ;;
esac

if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    python=$VIRTUAL_ENV/bin/python
else
    python=$(command -v python3 || true)
fi
if [ -z "$python" ] || ! "$python" -c "import torch" 2>/dev/null; then
    echo "device_race.sh: no Python with torch (got '${python:-none}'); set PYTHON=/path/to/python" >&2
    exit 2
fi

state="${CGGR_RACE_STATE:-$HOME}/cggr-race-$name"
repo="$(cd "$(dirname "$0")/.." && pwd)"
start=$SECONDS

if [ ! -f "$state/pid" ]; then
    mkdir -p "$state/out"
    rm -rf "$state/src" && cp -r "$repo/src" "$state/src"
    PYTHONPATH="$state/src" PYTHONUNBUFFERED=1 setsid nohup "$python" -m cggr.cli.main race "$@" \
        --out "$state/out" --name "race-$name" --no-progress > "$state/log" 2>&1 < /dev/null &
    echo $! > "$state/pid"
    echo "started race $name (pid $(cat "$state/pid")): cggr race $* --out $state/out --name race-$name"
fi

pid=$(cat "$state/pid")
while kill -0 "$pid" 2>/dev/null && [ $((SECONDS - start)) -lt "$wait_s" ]; do
    sleep 5
done

tail -n 12 "$state/log"
if kill -0 "$pid" 2>/dev/null; then
    echo "RUNNING ($name, waited $((SECONDS - start)) s)"
    exit 0
fi
if [ -n "${OUT:-}" ]; then
    cp "$state"/out/* "$OUT"/ 2>/dev/null
    cp "$state/log" "$OUT/race-$name.log"
fi
if [ -f "$state/out/race-$name.json" ]; then
    echo "DONE ($name)"
    exit 0
fi
echo "FAILED ($name): no race-$name.json; see the log above"
exit 1

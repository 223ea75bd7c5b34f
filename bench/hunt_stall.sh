#!/usr/bin/env bash
# Hunt the rare stalled HTTP request seen with the server inside Envoy (issue 11's note):
# start the demo server, run perf_analyzer over HTTP (c=4, 600 requests) again and again, and
# at the first run that stalls for 15 s dump what is needed to find it: the sockets (ss), the
# server's statistics and every Python thread of the server (py-spy), then stop.
#   usage: bench/hunt_stall.sh [SERVERS=4] [RUNS_PER_SERVER=30] [extra serve args...]
#   e.g.   bench/hunt_stall.sh 4 30 --grpc-transport envoy
# PA_ARGS replaces the load arguments (default: --request-count 600, the mode that stalls),
#   e.g.   PA_ARGS="$(bench/hunt_stall.sh --steady-args)" bench/hunt_stall.sh 4 30 ...
set -uo pipefail
STEADY="--measurement-mode count_windows --measurement-request-count 200 --stability-percentage 999"
if [ "${1:-}" = "--steady-args" ]; then echo "$STEADY"; exit 0; fi
pa_args=${PA_ARGS:---request-count 600}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
servers=${1:-4}; runs=${2:-30}
if [ $# -ge 2 ]; then shift 2; else set --; fi
work=$(mktemp -d)
py=$ROOT/.venv/bin/python
for srv in $(seq 1 "$servers"); do
  "$py" -m kernelport serve --host 127.0.0.1 --http-port 0 --grpc-port 0 --metrics-port 0 \
    --ports-file "$work/ports.json" "$@" > "$work/server$srv.log" 2>&1 &
  server=$!
  for _ in $(seq 300); do [ -f "$work/ports.json" ] && break; sleep 0.2; done
  http=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['http'])" "$work/ports.json")
  # the process that runs Python: Envoy's when the server is hosted there, else the server's
  pid=$(grep -o "(Envoy, pid [0-9]*" "$work/server$srv.log" | grep -o "[0-9]*$" || echo "$server")
  for i in $(seq 1 "$runs"); do
    "$ROOT/scripts/perf_analyzer" -m mlp -i http -u "127.0.0.1:$http" --concurrency-range 4:4 \
      $pa_args -f "$work/pa.csv" > "$work/pa.log" 2>&1 &
    pa=$!
    for _ in $(seq 75); do sleep 0.2; kill -0 "$pa" 2>/dev/null || break; done
    if kill -0 "$pa" 2>/dev/null; then
      exec > >(tee "$work/stall.txt") 2>&1
      echo "STALLED: server $srv, run $i (logs in $work)"
      ss -tnpi | grep -A1 ":$http" | head -40
      curl -s "http://127.0.0.1:$http/v2/models/mlp/stats" | head -c 400; echo
      "$ROOT/.venv/bin/py-spy" dump --pid "$pid" 2>&1 | tail -80
      # the client's side: where perf_analyzer's threads wait (needs gdb)
      command -v gdb >/dev/null && gdb -p "$pa" -batch -ex "thread apply all bt 8" 2>/dev/null \
        | grep -E "^Thread|^#" | head -80
      kill "$pa" "$server"; exit 1
    fi
  done
  echo "server $srv: $runs runs, none stalled"
  kill "$server"; wait "$server" 2>/dev/null; rm -f "$work/ports.json"
done

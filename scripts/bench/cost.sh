#!/usr/bin/env bash
# CPU per accepted OTP, process by process (issue 12), against release binaries on 127.0.0.1 only.
#
#   scripts/bench/cost.sh run                 one run: N=60000 OTPs at C=64 in flight (RATE=0: as
#                                             fast as the api takes them), then the cost table
#   scripts/bench/cost.sh ab DIR_A DIR_B      interleaved A/B/A/B… runs (ROUNDS=3) of two builds'
#                                             binaries (e.g. two CARGO_TARGET_DIRs' release/), a
#                                             summary line per run; ENV_A / ENV_B: settings
#                                             for each side's api and workers ("K=V K2=V2")
#   scripts/bench/cost.sh soak                SECS=600 at RATE=2000: RSS of the api and the worker
#                                             every EVERY=30 s, then the cost table
#   scripts/bench/cost.sh conns               the api's RSS idle, with CONNS=1000 open connections
#                                             under load, and after they close (needs wrk)
#   scripts/bench/cost.sh reads               verify and /v1/me throughput and CPU per operation on
#                                             the same stack (RATE=0: as fast as they go)
#
# Each run starts its own fake-sms, api and WORKERS=1 sms-worker(s) under a fresh NAMESPACE and
# database, with the defaults a deployment has (logs at info, as JSON, to a file; quorum queues;
# publisher confirms; the fraud guard in monitor mode), except OTP_PER_IP_PER_HOUR: loadgen is one
# IP. RabbitMQ and Redis are this machine's. Every figure is CPU time from /proc over the run,
# until the last SMS has reached fake-sms, divided by the accepted OTPs.
set -u
cd "$(dirname "$0")/../.."
source scripts/bench/common.sh
N=${N:-60000}; C=${C:-64}; RATE_GIVEN=${RATE:-}; RATE=${RATE:-0}; WORKERS=${WORKERS:-1}; ROUNDS=${ROUNDS:-3}
FAKE=9198; API=8198

# stack BIN_DIR: starts the api and the workers from BIN_DIR (fake-sms from $T, the same in A/B
# runs); sets $ns and $db.
stack() {
  local bin=$1 extra=${2:-} i
  ns=cost$RANDOM$RANDOM; db=bench_$ns
  FAKE_SMS_ADDR=127.0.0.1:$FAKE LOG_FORMAT=json $T/fake-sms >/tmp/bench-cost-fake.log 2>&1 & pids+=($!)
  NAMESPACE=$ns API_ADDR=127.0.0.1:$API LOG_FORMAT=json OTP_SECRET=bench-secret-0123456789 \
    OTP_PER_IP_PER_HOUR=100000000 OTP_VERIFY_FAILS_PER_IP_PER_HOUR=100000000 DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db?sslmode=disable" \
    env $extra $bin/api >/tmp/bench-cost-api.log 2>&1 & pids+=($!)
  for i in $(seq 1 "$WORKERS"); do
    NAMESPACE=$ns WORKER_ADDR=127.0.0.1:0 LOG_FORMAT=json SMS_PROVIDERS=twilio \
      TWILIO_BASE_URL=http://127.0.0.1:$FAKE TWILIO_ACCOUNT_SID=AC00000000000000000000000000fa4e00 \
      TWILIO_AUTH_TOKEN=fake-sms-auth-token TWILIO_FROM=+15005550006 WORKER_SEAL_KEY=$SEAL \
      env $extra $bin/sms-worker >>/tmp/bench-cost-worker.log 2>&1 & pids+=($!)
  done
  for _ in $(seq 1 300); do
    curl -sf http://127.0.0.1:$API/readyz >/dev/null && curl -sf http://127.0.0.1:$FAKE/ >/dev/null && break
    sleep 0.1
  done
  curl -sf http://127.0.0.1:$API/readyz >/dev/null || {
    echo "the api did not get ready:" >&2; tail -5 /tmp/bench-cost-api.log >&2; exit 1; }
  # The workers declare and consume their queue: wait for all of them to be on it.
  for _ in $(seq 1 300); do
    [[ $(rabbitmqctl -q list_queues name consumers 2>/dev/null | awk -v q="$ns.sms" '$1==q{print $2}') == "$WORKERS" ]] && break
    sleep 0.2
  done
  sleep 1 # let start-up work (migrations, connection pools) settle before the clock starts
}

unstack() {
  cleanup; pids=()
  drop_queues "$ns"
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1
  redis-cli --scan --pattern "$ns:*" | xargs -r -n 500 redis-cli del >/dev/null
}

# loadgen_cost [extra loadgen args…]: the run, as JSON in /tmp/bench-cost.json
loadgen_cost() {
  $T/loadgen request -c "$C" -n "$N" --rate "$RATE" --cost --json \
    --api-url http://127.0.0.1:$API --sms-url http://127.0.0.1:$FAKE "$@" >/tmp/bench-cost.json
}

# summary LABEL: one line from /tmp/bench-cost.json
summary() {
  python3 - "$1" <<'PY'
import json, sys
r = json.load(open('/tmp/bench-cost.json')); c = r['costs']
by = {}
for p in c['processes']:
    by[p['name']] = by.get(p['name'], 0) + p['us_per_op']
parts = '  '.join(f"{k} {v:5.0f}" for k, v in by.items())
d = r.get('delivery') or {}
print(f"{sys.argv[1]:>3} {r['throughput_per_sec']:6.0f}/s  total {c['total_us_per_op']:5.0f} us/OTP  [{parts}]"
      f"  202->sms p50 {d.get('p50_ms', 0):.1f} p99 {d.get('p99_ms', 0):.1f} ms  errors {sum(r['errors'].values())}"
      f"{' ' + json.dumps(r['errors']) if r['errors'] else ''}"
      f"  undelivered {r.get('undelivered')}")
PY
}

case "${1:-run}" in
run)
  stack "$T"; loadgen_cost; unstack
  summary "$(basename "$(dirname "$T")")"
  python3 - <<'PY'
import json
r = json.load(open('/tmp/bench-cost.json'))
for p in r['costs']['processes']:
    print(f"    {p['name']:>13}[{p['pid']}] {p['us_per_op']:7.1f} us/OTP  ({p['cpu_ms']:.0f} ms CPU, RSS {p['rss_mib']:.1f} MiB)")
print(f"    {'loadgen':>13}         {r['costs']['loadgen_us_per_op']:7.1f} us/OTP  (client, not in the total)")
PY
  ;;
ab)
  A=${2:?DIR_A}; B=${3:?DIR_B}
  for round in $(seq 1 "$ROUNDS"); do
    for side in A B; do
      bin=$A extra=${ENV_A:-}; [[ $side == B ]] && bin=$B extra=${ENV_B:-}
      stack "$bin" "$extra"; loadgen_cost; unstack; summary "$side"
    done
  done
  ;;
soak)
  # RATE defaults to 0 (saturation) above; a soak is at a fixed rate unless told otherwise.
  SECS=${SECS:-600}; RATE=${RATE_GIVEN:-2000}; N=$(python3 -c "print(int($SECS*$RATE))")
  stack "$T"; loadgen_cost --rss-every "${EVERY:-30}"; unstack; summary soak
  python3 - <<'PY'
import json
r = json.load(open('/tmp/bench-cost.json')); s = r['rss']
# Warm from the two-minute mark: pools, buffers and caches have grown to their working size.
first = next((i for i, x in enumerate(s) if x['at_secs'] >= 120), len(s) - 1)
warm = s[first]
for i, (name, pid, mib) in enumerate(warm['rss_mib']):
    series = [x['rss_mib'][i][2] for x in s[first:]] or [mib]
    print(f"  {name:>13}[{pid}] warm {series[0]:.1f} MiB, min {min(series):.1f}, max {max(series):.1f}, "
          f"last {series[-1]:.1f}: {100*(max(series)-min(series))/min(series):.1f} % spread")
PY
  ;;
conns)
  command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 2; }
  CONNS=${CONNS:-1000}
  stack "$T"; api=$(pgrep -n -x api)
  rss() { awk '/VmRSS/{printf "%.1f MiB", $2/1024}' /proc/$api/status; }
  echo "api idle: $(rss)"
  ulimit -n 65536 2>/dev/null || true # wrk needs a descriptor per connection
  wrk -t2 -c "$CONNS" -d "${SECS:-20}" http://127.0.0.1:$API/healthz >/tmp/bench-conns.txt 2>&1 &
  w=$!; sleep $((${SECS:-20} - 2)); echo "api with $CONNS connections: $(rss)"; wait $w
  grep -E "Requests/sec|Socket errors" /tmp/bench-conns.txt
  sleep 3; echo "api after they closed: $(rss)"
  unstack
  ;;
reads)
  # Verify and /v1/me kept (BENCHMARKS.md), on the same stack as the cost runs.
  stack "$T"
  # With --cost: CPU per verify and per /v1/me, PostgreSQL included (RATE: a fixed rate).
  for args in "verify -c 64 -n 30000" "me -c 64 -d 10"; do
    $T/loadgen $args --rate "$RATE" --cost --api-url http://127.0.0.1:$API --sms-url http://127.0.0.1:$FAKE |
      grep -E "scenario|throughput|latency|errors|  (api|redis|postgres|stack)"
  done
  unstack
  ;;
*) sed -n '2,22p' "$0"; exit 2 ;;
esac

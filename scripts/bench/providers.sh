#!/usr/bin/env bash
# Provider figures of BENCHMARKS.md (issue 9), against release binaries on 127.0.0.1 only.
#   scripts/bench/providers.sh drain      one worker emptying a pre-filled queue, by SMS_PROVIDERS,
#                                          interleaved (ROUNDS=3 N=5000 LAT=0 LISTS="twilio infobip twilio,infobip";
#                                          EXTRAS="A=1 CALLBACK_ADDR=…|CALLBACK_BASE_URL=…" compares settings)
#   scripts/bench/providers.sh failover   loadgen failover, three runs, two workers
#   scripts/bench/providers.sh tokens     four Infobip workers at 100 SMS/s for SECS=300 with 60 s tokens
set -u
cd "$(dirname "$0")/../.."
source scripts/bench/common.sh
PORT=9199
N=${N:-5000}; LAT=${LAT:-0}; ROUNDS=${ROUNDS:-3}; LISTS=${LISTS:-"twilio infobip twilio,infobip"}
FAKE_SMS_ADDR=127.0.0.1:$PORT $T/fake-sms >/tmp/bench-fake.log 2>&1 & pids+=($!)
sleep 1
cpu_ticks() { awk '{print $14+$15}' /proc/$1/stat; }
# worker NAMESPACE PROVIDERS PORT [EXTRA, as NAME=VALUE|NAME=VALUE]
worker() {
  local extra=${4:-A=1}
  NAMESPACE=$1 RUST_LOG=warn WORKER_ADDR=127.0.0.1:$3 SMS_PROVIDERS=$2 PROVIDER_BREAKER_COOLDOWN_SECS=${COOLDOWN:-5} \
    TWILIO_BASE_URL=http://127.0.0.1:$PORT TWILIO_ACCOUNT_SID=AC00000000000000000000000000fa4e00 \
    TWILIO_AUTH_TOKEN=fake-sms-auth-token TWILIO_FROM=+15005550006 \
    INFOBIP_BASE_URL=http://127.0.0.1:$PORT INFOBIP_SENDER=OTPAuth \
    INFOBIP_CLIENT_ID=fake-sms-infobip INFOBIP_CLIENT_SECRET=fake-sms-infobip-secret \
    WORKER_SEAL_KEY=$SEAL env ${extra//|/ } $T/sms-worker >>/tmp/bench-worker.log 2>&1 &
  echo $!
}
case "${1:-drain}" in
drain)
  curl -s -XPOST localhost:$PORT/control/carrier -H "content-type: application/json" -d '{"mute":true}' >/dev/null
  for round in $(seq 1 $ROUNDS); do for EXTRA in ${EXTRAS:-A=1}; do for providers in $LISTS; do
    ns=bench-$RANDOM$RANDOM
    W=$(worker $ns $providers 0 "$EXTRA"); sleep 1.5; kill $W; wait $W 2>/dev/null   # declares the topology
    curl -s -X DELETE http://127.0.0.1:$PORT/messages >/dev/null
    $T/loadgen drain -n $N --sms-latency-ms $LAT --namespace $ns --sms-url http://127.0.0.1:$PORT --json >/tmp/bench-drain.json 2>/dev/null &
    L=$!
    until [ "$(rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q=$ns.sms '$1==q{print $2}')" = "$N" ]; do sleep 0.3; done
    W=$(worker $ns $providers 0 "$EXTRA"); sleep 0.05
    before=$(cpu_ticks $W); wait $L; after=$(cpu_ticks $W)
    kill $W; wait $W 2>/dev/null
    curl -s http://127.0.0.1:$PORT/requests > /tmp/bench-requests.json
    EXTRA="$EXTRA" python3 - "$providers" "$before" "$after" <<'PY'
import json,sys,os,datetime
p,b,a=sys.argv[1],int(sys.argv[2]),int(sys.argv[3])
reqs=json.load(open('/tmp/bench-requests.json')); drain=json.load(open('/tmp/bench-drain.json'))
ok=[r for r in reqs if r['status'] in (200,201)]
ts=sorted(datetime.datetime.fromisoformat(r['received_at'].replace('Z','+00:00')) for r in ok)
span=(ts[-1]-ts[0]).total_seconds(); by={}
for r in ok: by[r['provider']]=by.get(r['provider'],0)+1
cpu=(a-b)/os.sysconf('SC_CLK_TCK')
print(f"{os.environ.get('EXTRA','')[:40]:40s} {p:16s} sent={len(ok):6d} {len(ok)/span:7.0f}/s  worker cpu {cpu*1e6/len(ok):5.0f} us/SMS  by={by} undelivered={drain['errors']}")
PY
    drop_queues $ns
  done; done; done ;;
failover)
  for run in 1 2 3; do
    ns=bench-$RANDOM$RANDOM
    w=(); for p in 0 0; do w+=($(worker $ns twilio,infobip $p)); done; pids+=("${w[@]}")
    sleep 2
    curl -s -XDELETE localhost:$PORT/messages >/dev/null
    $T/loadgen failover --rate 100 -d 30 --namespace $ns --sms-url http://127.0.0.1:$PORT
    kill "${w[@]}"; wait "${w[@]}" 2>/dev/null
    drop_queues $ns
  done ;;
tokens)
  ns=bench-$RANDOM$RANDOM
  curl -s -XPOST localhost:$PORT/control/infobip -H 'content-type: application/json' \
    -d '{"lifetime_secs": 60, "calls_per_second": 1, "invalidate_previous": true}' >/dev/null
  w=(); for p in 0 0 0 0; do w+=($(worker $ns infobip $p)); done; pids+=("${w[@]}")
  sleep 2
  $T/loadgen failover --rate 100 -d ${SECS:-300} --namespace $ns --sms-url http://127.0.0.1:$PORT
  curl -s localhost:$PORT/control/infobip/token-calls | python3 -c 'import json,sys; c=json.load(sys.stdin); print("token calls:", len(c), "statuses:", sorted(set(x["status"] for x in c)), "max concurrent:", max(x["concurrent"] for x in c)); [print(" ", x["at"], x["status"]) for x in c]'
  kill "${w[@]}"; wait "${w[@]}" 2>/dev/null
  drop_queues $ns ;;
*) echo "usage: $0 drain|failover|tokens" >&2; exit 2 ;;
esac

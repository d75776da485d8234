#!/usr/bin/env bash
# Receipt figures of BENCHMARKS.md (issue 10), against release binaries on 127.0.0.1 only: how
# many receipts one worker absorbs (and its CPU per receipt), and the delay to a resend.
#   scripts/bench/receipts.sh      (N=4000 CONCURRENCY="16 64 16 64" N_RESEND=300)
set -u
cd "$(dirname "$0")/../.."
source scripts/bench/common.sh
SMS=9199; API=8180; WK=9191; CB=9192
NS=bench10-$RANDOM$RANDOM
trap 'cleanup; drop_queues $NS; psql -qU postgres -h 127.0.0.1 -c "drop database if exists otp_bench10 with (force)" >/dev/null 2>&1' EXIT
FAKE_SMS_ADDR=127.0.0.1:$SMS $T/fake-sms >/tmp/b10-fake.log 2>&1 & pids+=($!)
NAMESPACE=$NS API_ADDR=127.0.0.1:$API OTP_PER_IP_PER_HOUR=100000000 OTP_PER_PHONE_PER_HOUR=100 \
  OTP_SECRET=bench-secret-0123456789 DATABASE_URL="postgres://postgres@127.0.0.1:5432/otp_bench10?sslmode=disable" \
  RUST_LOG=warn $T/api >/tmp/b10-api.log 2>&1 & pids+=($!)
NAMESPACE=$NS RUST_LOG=warn WORKER_ADDR=127.0.0.1:$WK SMS_PROVIDERS=twilio,infobip \
  CALLBACK_ADDR=127.0.0.1:$CB CALLBACK_BASE_URL=http://127.0.0.1:$CB \
  TWILIO_BASE_URL=http://127.0.0.1:$SMS TWILIO_ACCOUNT_SID=AC00000000000000000000000000fa4e00 \
  TWILIO_AUTH_TOKEN=fake-sms-auth-token TWILIO_FROM=+15005550006 \
  INFOBIP_BASE_URL=http://127.0.0.1:$SMS INFOBIP_SENDER=OTPAuth \
  INFOBIP_CLIENT_ID=fake-sms-infobip INFOBIP_CLIENT_SECRET=fake-sms-infobip-secret \
  WORKER_SEAL_KEY=$SEAL $T/sms-worker >/tmp/b10-worker.log 2>&1 & W=$!; pids+=($W)
sleep 2
# The worker's CPU ticks every 50 ms, with a timestamp, for the posting window.
( while kill -0 $W 2>/dev/null; do echo "$(date +%s%3N) $(awk '{print $14+$15}' /proc/$W/stat)"; sleep 0.05; done ) > /tmp/b10-cpu.txt & pids+=($!)
L="$T/loadgen --namespace $NS --sms-url http://127.0.0.1:$SMS --api-url http://127.0.0.1:$API --callback-url http://127.0.0.1:$CB"
for c in ${CONCURRENCY:-16 64 16 64}; do
  $L receipts -n ${N:-4000} -c $c --json > /tmp/b10-receipts.json
  python3 - <<'PY'
import json,os
r=json.load(open('/tmp/b10-receipts.json'))
f=r['figures']; lo,hi=f['posting_from_unix_ms'],f['posting_to_unix_ms']
samples=[tuple(map(int,l.split())) for l in open('/tmp/b10-cpu.txt') if len(l.split())==2]
def at(t):
    prev=samples[0]
    for s in samples:
        if s[0]>=t: return s[1]
    return samples[-1][1]
ticks=at(hi)-at(lo); hz=os.sysconf('SC_CLK_TCK')
lat=r['latency']
print(f"receipts -c {r['concurrency']:3d}: {r['ok']} callbacks in {r['elapsed_secs']:.2f} s = {r['throughput_per_sec']:.0f}/s, p50 {lat['p50_ms']:.1f} ms p99 {lat['p99_ms']:.1f} ms, errors {r['errors']}, worker cpu {ticks/hz*1e6/max(r['ok'],1):.0f} us/receipt")
PY
done
$L resend -n ${N_RESEND:-300} --rate 50

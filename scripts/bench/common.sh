# Shared by the benchmark scripts: where the release binaries are, and cleanup.
T=${T:-$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)/release}
[[ -x $T/sms-worker && -x $T/loadgen && -x $T/fake-sms ]] || {
  echo "build first: cargo build --release -p api -p sms-worker -p tests --bins" >&2; exit 2; }
# A benchmark key for what the workers seal in Redis: never use it anywhere else.
SEAL=YmVuY2htYXJrLXNlYWwta2V5LW5vdC1mb3ItcHJvZCE=
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
drop_queues() { for q in sms sms.dlq sms.dead; do rabbitmqctl -q delete_queue "$1.$q" >/dev/null 2>&1; done; }

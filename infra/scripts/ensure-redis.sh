#!/usr/bin/env bash
# Makes sure a Redis is listening: reuse REDIS_URL (default redis://127.0.0.1:6379),
# else start redis-server locally, else say how to install it.
set -euo pipefail
url="${REDIS_URL:-redis://127.0.0.1:6379}"
hostport="${url#redis://}"; hostport="${hostport##*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$host" ] && port=6379

ping() {
  if command -v redis-cli >/dev/null 2>&1; then
    redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG
  else
    (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null
  fi
}

if ping; then echo "redis: reusing $host:$port"; exit 0; fi

case "$host" in
  127.0.0.1|localhost|::1) ;;
  *) echo "redis: nothing answers at $url, and it is not local, so it will not be started here" >&2; exit 1 ;;
esac

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis: nothing listens on $host:$port and redis-server is not installed." >&2
  echo "       Install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)" >&2
  echo "       or point REDIS_URL at a running Redis 7." >&2
  exit 1
fi

dir="${MOE_REDIS_DIR:-${TMPDIR:-/tmp}/moe-edge-redis}"
mkdir -p "$dir"
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$dir" \
  --appendonly yes --appendfsync everysec --logfile "$dir/redis.log" --pidfile "$dir/redis.pid"
for _ in $(seq 1 50); do
  # The last line names the pid file, so a caller that started it can stop it.
  ping && { echo "redis: started on $host:$port (data in $dir)"; echo "pidfile=$dir/redis.pid"; exit 0; }
  sleep 0.1
done
echo "redis: started redis-server but it does not answer on $host:$port; see $dir/redis.log" >&2
exit 1

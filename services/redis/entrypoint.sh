#!/bin/sh
# Starts redis-server with the password from REDIS_PASSWORD, or from the file
# REDIS_PASSWORD_FILE names (a Docker secret in stack.yaml). The password goes
# into an include file, never onto a command line: `ps` on the host lists the
# container's processes with their arguments. Its size, maxmemory, comes from
# REDIS_MAXMEMORY.
set -eu

if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
  if [ -n "${REDIS_PASSWORD:-}" ]; then
    echo "taskstack-redis: set REDIS_PASSWORD or REDIS_PASSWORD_FILE, not both" >&2
    exit 1
  fi
  if [ ! -r "$REDIS_PASSWORD_FILE" ]; then
    echo "taskstack-redis: REDIS_PASSWORD_FILE=$REDIS_PASSWORD_FILE cannot be read" >&2
    exit 1
  fi
  # $(...) drops the file's final newlines, as taskstack.settings does.
  REDIS_PASSWORD=$(cat "$REDIS_PASSWORD_FILE")
fi
if [ -z "${REDIS_PASSWORD:-}" ]; then
  echo "taskstack-redis: REDIS_PASSWORD is empty; refusing to start a Redis without a password" >&2
  exit 1
fi
# Same rule as taskstack.settings.Settings.check_exposure: the public default
# password is only acceptable while the published port stays on loopback.
case "${BIND_ADDRESS:-127.0.0.1}" in
  127.* | ::1) ;;
  *)
    if [ "$REDIS_PASSWORD" = taskstack-local ]; then
      echo "taskstack-redis: BIND_ADDRESS=$BIND_ADDRESS exposes Redis to other hosts," \
           "but REDIS_PASSWORD still has its public default: set your own" >&2
      exit 1
    fi
    ;;
esac

# Bytes Redis may hold; taskstack/settings.py's default (Settings.redis_maxmemory)
# when unset: 4 GiB. docs/configuration.md says how to size it.
maxmemory=${REDIS_MAXMEMORY:-4294967296}
case "$maxmemory" in
  "" | *[!0-9]* | 0)
    echo "taskstack-redis: REDIS_MAXMEMORY must be a positive number of bytes, got '$maxmemory'" >&2
    exit 1
    ;;
esac

auth_file=/tmp/taskstack-redis-auth.conf
umask 077
rm -f "$auth_file"
# Inside a double-quoted config value, backslash and double quote need escaping.
# printf is a shell builtin and sed reads the password from stdin: no argv.
printf '%s' "$REDIS_PASSWORD" | sed 's/[\\"]/\\&/g; s/^/requirepass "/; s/$/"/' > "$auth_file"
unset REDIS_PASSWORD

# exec: redis-server becomes PID 1 and gets docker stop's SIGTERM itself.
exec redis-server /usr/local/etc/redis/redis.conf --include "$auth_file" --maxmemory "$maxmemory" "$@"

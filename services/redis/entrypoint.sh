#!/bin/sh
# Starts redis-server with the password from REDIS_PASSWORD, or from the file
# REDIS_PASSWORD_FILE names; or, with REDIS_USERS_DIR (stack.yaml, compose.tls.yaml),
# with a user per role from its files redis_user_<name> (Docker secrets) and the
# default user off; with REDIS_TLS_CERT_FILE, over TLS only (taskstack-redis.sh).
# Passwords go into an include file, never onto a command line: `ps` on the host
# lists the container's processes with their arguments. Its size, maxmemory,
# comes from REDIS_MAXMEMORY.
set -eu

. /usr/local/lib/taskstack-redis.sh
if [ -n "${REDIS_USERS_DIR:-}" ]; then
  # One user per role (users.acl); the primary's replicas and Sentinels have theirs.
  REDIS_PASSWORD=$(user_password admin)
else
  load_password taskstack-redis
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
if [ -n "${REDIS_USERS_DIR:-}" ]; then
  acl_users /usr/local/etc/redis/users.acl > "$auth_file"
  replication_user=replica
  replication_password=$(user_password replica)
  REDISCLI_USER=sentinel
  export REDISCLI_USER
  REDIS_PASSWORD=$(user_password sentinel)  # asks the Sentinels and the servers
else
  # Inside a double-quoted config value, backslash and double quote need escaping.
  # printf is a shell builtin and sed reads the password from stdin: no argv.
  printf '%s' "$REDIS_PASSWORD" | sed 's/[\\"]/\\&/g; s/^/requirepass "/; s/$/"/' > "$auth_file"
  echo >> "$auth_file"  # ends the requirepass line
  replication_user=
  replication_password=$REDIS_PASSWORD
fi
tls_config 6379 >> "$auth_file"

# A replicated Redis (stack.yaml, compose.ha.yaml): REDIS_ANNOUNCE_HOSTNAME is its
# own DNS name. It starts as a replica of the primary the Sentinels name (a
# rescheduled old primary must not come back as a second primary), and a primary
# without a replica in sync refuses writes that a failover would drop.
if [ -n "${REDIS_ANNOUNCE_HOSTNAME:-}" ]; then
  export REDISCLI_AUTH="$REDIS_PASSWORD"
  set -- $(current_primary) "$@"
  primary=$1
  primary_port=$2
  shift 2
  {
    if [ -n "$replication_user" ]; then
      echo "masteruser $replication_user"
    fi
    printf '%s' "$replication_password" | config_quoted | sed 's/^/masterauth /'
    echo
    echo "min-replicas-to-write 1"
    echo "min-replicas-max-lag 10"
    if [ "$primary" != self ] && ! own_address "$primary"; then
      echo "replicaof $primary $primary_port"
    fi
  } >> "$auth_file"
  unset REDISCLI_AUTH REDISCLI_USER
  echo "taskstack-redis: $REDIS_ANNOUNCE_HOSTNAME starts with primary $primary"
fi
unset REDIS_PASSWORD replication_password

# exec: redis-server becomes PID 1 and gets docker stop's SIGTERM itself.
exec redis-server /usr/local/etc/redis/redis.conf --include "$auth_file" --maxmemory "$maxmemory" "$@"

#!/bin/sh
# Starts a Redis Sentinel of a replicated stack (stack.yaml, compose.ha.yaml) with
# the password from REDIS_PASSWORD_FILE (a Docker secret), or REDIS_PASSWORD.
# Sentinel rewrites its config file as it learns, so the file is written here,
# in the container, never on a command line: it requires the password of its
# clients (requirepass), and uses it with the Redis servers (auth-pass) and the
# other Sentinels (sentinel-pass). With REDIS_USERS_DIR (stack.yaml), its clients
# are the stack's users instead (sentinel-users.acl), and it is user sentinel to
# Redis and to the other Sentinels; with REDIS_TLS_CERT_FILE, TLS only.
#   SENTINEL_ANNOUNCE_HOSTNAME  its own DNS name, for its messages
#   SENTINEL_QUORUM             Sentinels that must agree a primary is down (2)
#   SENTINEL_DOWN_AFTER_MS      silence before one thinks so (5000)
#   SENTINEL_FAILOVER_TIMEOUT_MS  before a stalled failover is tried again (30000)
# and REDIS_SENTINELS, REDIS_MASTER_NAME, REDIS_SERVERS, REDIS_PRIMARY (see
# taskstack-redis.sh).
set -eu

. /usr/local/lib/taskstack-redis.sh
if [ -n "${REDIS_USERS_DIR:-}" ]; then
  # Users of their own (sentinel-users.acl); to Redis and to each other, user sentinel.
  REDIS_PASSWORD=$(user_password sentinel)
  REDISCLI_USER=sentinel
  export REDISCLI_USER
else
  load_password taskstack-sentinel
fi
: "${SENTINEL_ANNOUNCE_HOSTNAME:?SENTINEL_ANNOUNCE_HOSTNAME names this Sentinel}"
master=${REDIS_MASTER_NAME:-taskstack}
REDISCLI_AUTH=$REDIS_PASSWORD
export REDISCLI_AUTH
unset REDIS_PASSWORD

# A Sentinel that restarts after a failover monitors the primary of now, which
# the others know; the first ones start from REDIS_PRIMARY.
set -- $(current_primary)
primary=$1
primary_port=$2

config=/tmp/taskstack-sentinel.conf
umask 077
rm -f "$config"
password=$(printf '%s' "$REDISCLI_AUTH" | config_quoted)
unset REDISCLI_AUTH
if [ -n "${REDIS_USERS_DIR:-}" ]; then
  acl_users /usr/local/etc/redis/sentinel-users.acl > "$config"
else
  echo "requirepass $password" > "$config"
fi
tls_config 26379 >> "$config"
cat >> "$config" <<CONF
dir /tmp
sentinel sentinel-pass $password
sentinel monitor $master $primary $primary_port ${SENTINEL_QUORUM:-2}
sentinel auth-pass $master $password
sentinel down-after-milliseconds $master ${SENTINEL_DOWN_AFTER_MS:-5000}
sentinel failover-timeout $master ${SENTINEL_FAILOVER_TIMEOUT_MS:-30000}
sentinel parallel-syncs $master 1
CONF
if [ -n "${REDIS_USERS_DIR:-}" ]; then
  printf 'sentinel sentinel-user sentinel\nsentinel auth-user %s sentinel\n' "$master" >> "$config"
fi
unset password REDISCLI_USER
echo "taskstack-sentinel: $SENTINEL_ANNOUNCE_HOSTNAME monitors $master at $primary:$primary_port"
exec redis-server "$config" --sentinel

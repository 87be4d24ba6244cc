# Sourced by the Redis and Sentinel entrypoints: their password, and in a
# replicated stack (stack.yaml, compose.ha.yaml) which Redis is the primary now.
#   REDIS_SENTINELS    sentinel-1:26379,sentinel-2:26379,...: asked first
#   REDIS_MASTER_NAME  the name they monitor the primary under (taskstack)
#   REDIS_SERVERS      redis-1,redis-2,redis-3: asked next, for their role
#   REDIS_PRIMARY      the primary of a first start, when no one knows one yet
# The caller has set REDISCLI_AUTH (the Sentinels take Redis's password): an
# environment variable of this process, never an argument `ps` would list.
#
# The primary is named by its IP address, resolved here once: Sentinel and
# replicas keep addresses, not names. On Swarm, the DNS name of a service whose
# node is gone goes to the node's own resolvers, which may take seconds to fail it
# (20 s where none answered), and a Sentinel that resolves names
# (resolve-hostnames) blocks on it, misses its own timers, enters TILT mode and
# fails over nothing.

# Every network call here is bounded: a host that is cut off never answers.
ask() {
  timeout 3 redis-cli --no-auth-warning --raw "$@" 2>/dev/null || true
}

# Prints the IP address of NAME (or NAME, if it is one), or nothing in time.
address_of() {
  timeout 3 getent hosts "$1" | awk '{ print $1; exit }' || true
}

# Prints "ADDRESS PORT" of the primary: as the first Sentinel that answers names
# it; else the Redis that says it is a primary with a replica (or any primary);
# else REDIS_PRIMARY once it resolves ("self" in REDIS_PRIMARY itself). Waits until
# one of them answers.
current_primary() {
  while true; do
    for sentinel in $(printf '%s' "${REDIS_SENTINELS:-}" | tr ',' ' '); do
      set -- $(ask -h "${sentinel%:*}" -p "${sentinel##*:}" \
        SENTINEL get-master-addr-by-name "${REDIS_MASTER_NAME:-taskstack}")
      if [ $# -eq 2 ]; then
        echo "$1 $2"
        return
      fi
    done
    lone=
    for server in $(printf '%s' "${REDIS_SERVERS:-}" | tr ',' ' '); do
      info=$(ask -h "$server" INFO replication | tr -d '\r')
      case "$info" in
        *role:master*connected_slaves:[1-9]*)
          echo "$(address_of "$server") 6379"
          return
          ;;
        *role:master*) lone=${lone:-$server} ;;
      esac
    done
    # The first primary starts as one: Swarm's DNS names no task before it is healthy.
    if [ "${REDIS_PRIMARY:?REDIS_PRIMARY names the first primary}" = "${REDIS_ANNOUNCE_HOSTNAME:-}" ]; then
      echo "self 6379"
      return
    fi
    for name in $lone "$REDIS_PRIMARY"; do
      address=$(address_of "$name")
      if [ -n "$address" ]; then
        echo "$address 6379"
        return
      fi
    done
    echo "taskstack-redis: no primary known yet; asking again" >&2
    sleep 1
  done
}

# Whether ADDRESS is this container's own (Docker lists it in /etc/hosts).
own_address() {
  grep -q "^$1[[:space:]]" /etc/hosts
}

# Quotes a config value: backslash and double quote escaped, read from stdin.
config_quoted() {
  sed 's/[\\"]/\\&/g; s/^/"/; s/$/"/'
}

# Sets REDIS_PASSWORD from the file REDIS_PASSWORD_FILE names (a Docker secret),
# or checks the one given; $1 names the caller in its messages.
load_password() {
  if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
    if [ -n "${REDIS_PASSWORD:-}" ]; then
      echo "$1: set REDIS_PASSWORD or REDIS_PASSWORD_FILE, not both" >&2
      exit 1
    fi
    if [ ! -r "$REDIS_PASSWORD_FILE" ]; then
      echo "$1: REDIS_PASSWORD_FILE=$REDIS_PASSWORD_FILE cannot be read" >&2
      exit 1
    fi
    # $(...) drops the file's final newlines, as taskstack.settings does.
    REDIS_PASSWORD=$(cat "$REDIS_PASSWORD_FILE")
  fi
  if [ -z "${REDIS_PASSWORD:-}" ]; then
    echo "$1: REDIS_PASSWORD is empty; refusing to start without a password" >&2
    exit 1
  fi
}

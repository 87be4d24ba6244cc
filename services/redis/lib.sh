# Sourced by the Redis and Sentinel entrypoints: their password, and in a
# replicated stack (stack.yaml, compose.ha.yaml) which Redis is the primary now. Addresses are Swarm DNS names (the services'),
# which survive rescheduling where container IPs do not.
#   REDIS_SENTINELS    sentinel-1:26379,sentinel-2:26379,...: asked first
#   REDIS_MASTER_NAME  the name they monitor the primary under (taskstack)
#   REDIS_PRIMARY      the primary of a first start, when no Sentinel knows one yet
# The caller has set REDISCLI_AUTH (the Sentinels take Redis's password): an
# environment variable of this process, never an argument `ps` would list.

# Prints "HOST PORT" of the primary the first Sentinel that answers names, or
# of REDIS_PRIMARY when none does.
current_primary() {
  for sentinel in $(printf '%s' "${REDIS_SENTINELS:-}" | tr ',' ' '); do
    host=${sentinel%:*}
    port=${sentinel##*:}
    # A Sentinel on a host that is cut off never answers: bound the wait.
    answer=$(timeout 3 redis-cli --no-auth-warning --raw -h "$host" -p "$port" \
      SENTINEL get-master-addr-by-name "${REDIS_MASTER_NAME:-taskstack}" 2>/dev/null || true)
    set -- $answer
    if [ $# -eq 2 ] && [ -n "$1" ]; then
      echo "$1 $2"
      return
    fi
  done
  echo "${REDIS_PRIMARY:?REDIS_PRIMARY names the first primary} 6379"
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

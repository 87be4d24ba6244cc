# Sourced by the Redis and Sentinel entrypoints: their password, and in a
# replicated stack (stack.yaml, compose.ha.yaml) which Redis is the primary now.
#   REDIS_SENTINELS    sentinel-1:26379,sentinel-2:26379,...: asked first
#   REDIS_MASTER_NAME  the name they monitor the primary under (taskstack)
#   REDIS_SERVERS      redis-1,redis-2,redis-3: asked next, for their role
#   REDIS_PRIMARY      the primary of a first start, when no one knows one yet
# The caller has set REDISCLI_AUTH (the Sentinels take Redis's password), and with
# Redis users REDISCLI_USER (sentinel): environment variables of this process, never
# an argument `ps` would list.
#
# The primary is named by its IP address, resolved here once: Sentinel and
# replicas keep addresses, not names. On Swarm, the DNS name of a service whose
# node is gone goes to the node's own resolvers, which may take seconds to fail it
# (20 s where none answered), and a Sentinel that resolves names
# (resolve-hostnames) blocks on it, misses its own timers, enters TILT mode and
# fails over nothing.

# Every network call here is bounded: a host that is cut off never answers.
ask() {
  timeout 3 redis-cli $(cli_options) --no-auth-warning --raw "$@" 2>/dev/null || true
}

# Prints the options of every redis-cli call here: TLS with the stack's CA, and with
# Redis users the user whose password REDISCLI_AUTH holds (REDISCLI_USER).
cli_options() {
  if [ -n "${REDIS_TLS_CERT_FILE:-}" ]; then
    echo "--tls --cacert ${REDIS_TLS_CA_FILE:?}"
  fi
  if [ -n "${REDISCLI_USER:-}" ]; then
    echo "--user $REDISCLI_USER"
  fi
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

# -- Redis users (docs/deployment.md) ------------------------------------------------
# With REDIS_USERS_DIR (/run/secrets in stack.yaml), every file redis_user_<name> there
# holds the password of user <name>, whose rules are its role's line in ROLES_FILE; the
# default user is off. Passwords reach the config as SHA-256 hashes only.

# Prints the password of user $1, from REDIS_USERS_DIR.
user_password() {
  file="${REDIS_USERS_DIR:?}/redis_user_$1"
  if [ ! -r "$file" ]; then
    echo "taskstack-redis: $file cannot be read: the stack's users need a secret redis_user_$1" >&2
    exit 1
  fi
  cat "$file"
}

# Prints a `user` line for every redis_user_<name> in REDIS_USERS_DIR, with the rules of
# its role in the file $1, and one that turns the default user off.
acl_users() {
  for file in "${REDIS_USERS_DIR:?}"/redis_user_*; do
    [ -e "$file" ] || continue
    name=${file##*/redis_user_}
    case "$name" in
      *[!A-Za-z0-9_-]* | "")
        echo "taskstack-redis: $file: a user name takes letters, digits, - and _ only" >&2
        exit 1
        ;;
      client-*) role=client ;;
      *) role=$name ;;
    esac
    rules=$(awk -v role="$role" '$1 == role { $1 = ""; print; exit }' "$1")
    if [ -z "$rules" ]; then
      echo "taskstack-redis: $file names user $name, but $1 has no role $role" >&2
      exit 1
    fi
    hash=$(printf '%s' "$(cat "$file")" | sha256sum | cut -d' ' -f1)
    echo "user $name reset on #$hash$(printf '%s' "$rules" | sed "s/{name}/$name/g")"
  done
  # Off and without a password: no connection can be the default user. Its rules are
  # Redis's own AOF replay's, which runs as the default user: with none, Redis 7 drops
  # every MULTI/EXEC block of the append-only file on restart (NOPERM at EXEC; fixed in
  # redis/redis#14545, not in 7.x).
  echo "user default reset off ~* &* +@all"
}

# -- TLS ----------------------------------------------------------------------------
# With REDIS_TLS_CERT_FILE, Redis and Sentinel listen with TLS only, on their usual
# ports (6379, 26379), and use it to reach each other; clients need no certificate of
# their own (tls-auth-clients no): they authenticate as their user.
#   REDIS_TLS_CERT_FILE, REDIS_TLS_KEY_FILE  this server's (scripts/swarm-certs)
#   REDIS_TLS_CA_FILE                        the CA that signed every server's

# Prints the TLS lines of a config listening on port $1.
tls_config() {
  if [ -z "${REDIS_TLS_CERT_FILE:-}" ]; then
    echo "port $1"
    return
  fi
  echo "port 0"
  echo "tls-port $1"
  echo "tls-cert-file ${REDIS_TLS_CERT_FILE}"
  echo "tls-key-file ${REDIS_TLS_KEY_FILE:?REDIS_TLS_KEY_FILE names the key of REDIS_TLS_CERT_FILE}"
  echo "tls-ca-cert-file ${REDIS_TLS_CA_FILE:?REDIS_TLS_CA_FILE names the CA of REDIS_TLS_CERT_FILE}"
  echo "tls-auth-clients no"
  echo "tls-replication yes"
}

#!/bin/sh
# Starts Prometheus with the stack's configuration. Flower's password comes from
# FLOWER_PASSWORD or from the file FLOWER_PASSWORD_FILE names (a Docker secret in
# stack.yaml) and goes into a file of this container's own, which the scrape
# config reads (basic_auth.password_file): never onto a command line, since `ps`
# on the host lists the container's processes with their arguments.
set -eu

run=/tmp/taskstack-prometheus
umask 077
mkdir -p "$run"

if [ -n "${FLOWER_PASSWORD_FILE:-}" ]; then
  if [ -n "${FLOWER_PASSWORD:-}" ]; then
    echo "taskstack-prometheus: set FLOWER_PASSWORD or FLOWER_PASSWORD_FILE, not both" >&2
    exit 1
  fi
  if [ ! -r "$FLOWER_PASSWORD_FILE" ]; then
    echo "taskstack-prometheus: FLOWER_PASSWORD_FILE=$FLOWER_PASSWORD_FILE cannot be read" >&2
    exit 1
  fi
  # $(...) drops the file's final newlines, as taskstack.settings does.
  FLOWER_PASSWORD=$(cat "$FLOWER_PASSWORD_FILE")
fi
if [ -z "${FLOWER_PASSWORD:-}" ]; then
  echo "taskstack-prometheus: FLOWER_PASSWORD is empty; Flower's metrics need it" >&2
  exit 1
fi
# printf is a shell builtin: the password is on no process's argv.
printf '%s' "$FLOWER_PASSWORD" > "$run/flower_password"
unset FLOWER_PASSWORD

# Prometheus expands no variables in its config: the user is written in here,
# so it is held to characters that need no quoting in YAML or in sed.
case "${FLOWER_USER:=admin}" in
  *[!A-Za-z0-9._@-]*)
    echo "taskstack-prometheus: FLOWER_USER may hold only letters, digits and . _ @ -" >&2
    exit 1
    ;;
esac
sed "s|@FLOWER_USER@|$FLOWER_USER|" /etc/taskstack/prometheus.yml > "$run/prometheus.yml"

# Prometheus serves its pages and API to whoever reaches its port (read-only:
# no admin API, no lifecycle endpoints); beyond loopback, say so.
case "${BIND_ADDRESS:-127.0.0.1}" in
  127.* | ::1) ;;
  *)
    echo "taskstack-prometheus: BIND_ADDRESS=$BIND_ADDRESS publishes Prometheus, which asks" \
         "for no password, to other hosts: keep them on a trusted network" >&2
    ;;
esac

# exec: Prometheus becomes PID 1 and gets docker stop's SIGTERM itself.
exec /bin/prometheus \
  --config.file="$run/prometheus.yml" \
  --storage.tsdb.path=/prometheus \
  --storage.tsdb.retention.time="${PROMETHEUS_RETENTION_TIME:-15d}" \
  --storage.tsdb.retention.size="${PROMETHEUS_RETENTION_SIZE:-2GB}" \
  --web.listen-address=0.0.0.0:9090 \
  "$@"

#!/usr/bin/env bash
# Start a local PostgreSQL for the study-storage tests (Debian 12, run as root; idempotent).
#
#   bash .ci/postgres.sh > env.sh && . env.sh     # sets HARNESS_TEST_POSTGRES_URL
#
# Never call it as $(bash .ci/postgres.sh): the daemon it starts would inherit the pipe and the
# command substitution would never end (fd 3 is also closed for the daemon below).
#
# Installs the postgresql package when missing (non-interactive), makes sure a cluster "main" of
# the newest installed version exists, listens on 127.0.0.1:5432 only and is running, and creates
# role harness (password harness) owning database harness_test. Progress goes to stderr; stdout
# carries only the export line for the caller to eval.
set -euo pipefail
exec 3>&1 1>&2

PORT=5432
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "postgres.sh: must run as root" >&2
    exit 1
fi

if ! command -v pg_lsclusters >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "installing postgresql ..."
    apt-get update -qq
    apt-get install -y -qq -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        postgresql >/dev/null
fi

VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {found = 1} END {exit !found}'; then
    echo "creating cluster $VERSION/main ..."
    pg_createcluster "$VERSION" main --port "$PORT" >/dev/null
fi

# settings go into a conf.d drop-in (Debian's postgresql.conf includes conf.d)
CONF_DIR="/etc/postgresql/$VERSION/main"
mkdir -p "$CONF_DIR/conf.d"
# repair an unquoted listen_addresses line written by an early version of this script
sed -i -E "/^listen_addresses = [0-9]/d" "$CONF_DIR/postgresql.conf"
WANT="listen_addresses = '127.0.0.1'
port = $PORT"
changed=0
if [ "$(cat "$CONF_DIR/conf.d/harness.conf" 2>/dev/null)" != "$WANT" ]; then
    printf '%s\n' "$WANT" > "$CONF_DIR/conf.d/harness.conf"
    changed=1
fi

status="$(pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $4}')"
if [ "$status" = "online" ] && [ "$changed" = 1 ]; then
    echo "restarting cluster $VERSION/main for the new listen settings ..."
    pg_ctlcluster "$VERSION" main restart 3>&-
elif [ "$status" != "online" ]; then
    echo "starting cluster $VERSION/main ..."
    pg_ctlcluster "$VERSION" main start 3>&-
fi

for _ in $(seq 1 60); do
    if pg_isready -q -h 127.0.0.1 -p "$PORT"; then
        break
    fi
    sleep 0.5
done
pg_isready -h 127.0.0.1 -p "$PORT" >/dev/null

psql_admin() {
    runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PORT" "$@"
}

psql_admin -c "DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'harness') THEN
    CREATE ROLE harness LOGIN PASSWORD 'harness';
  ELSE
    ALTER ROLE harness LOGIN PASSWORD 'harness';
  END IF;
END \$\$;"
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = 'harness_test'")" != "1" ]; then
    runuser -u postgres -- createdb -p "$PORT" -O harness harness_test
fi
psql_admin -d harness_test -c "ALTER DATABASE harness_test OWNER TO harness; ALTER SCHEMA public OWNER TO harness;"

echo "PostgreSQL $VERSION ready on 127.0.0.1:$PORT (database harness_test, role harness)"
echo "export HARNESS_TEST_POSTGRES_URL=postgresql+psycopg2://harness:harness@127.0.0.1:$PORT/harness_test" >&3

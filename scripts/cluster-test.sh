#!/usr/bin/env bash
# Run the cluster suite (tests/cluster_suite): a 3-node MariaDB Galera cluster behind
# haproxy, a PostgreSQL primary with a synchronous standby, pgbouncer in transaction mode,
# all started and stopped by the tests on 127.0.0.1 (tests/cluster.py).
#
# Installs what is missing (galera-4, haproxy, pgbouncer, rsync and the database servers
# via apt when run as root; the package with its test extra, which brings psycopg 3, via
# pip), then runs pytest --cluster; arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup-lib.sh

missing=()
[[ -e /usr/lib/galera/libgalera_smm.so ]] || missing+=(galera-4)
command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
command -v pgbouncer >/dev/null || [[ -x /usr/sbin/pgbouncer ]] || missing+=(pgbouncer)
command -v rsync >/dev/null || missing+=(rsync)
command -v mariadbd >/dev/null || [[ -x /usr/sbin/mariadbd ]] || missing+=(mariadb-server)
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql-15)
install_and_setup scripts/cluster-test.sh "${missing[@]}"

if (($# == 0)); then
    set -- -q -ra -p no:cacheprovider tests/cluster_suite
fi
exec python -m pytest --cluster "$@"

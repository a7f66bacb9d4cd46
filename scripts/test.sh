#!/usr/bin/env bash
# Run the test suite against SQLite, PostgreSQL and MariaDB.
#
# Installs what is missing (PostgreSQL and MariaDB server packages, chromium and
# chromium-driver via apt when run as root, the package with its test extras via pip),
# then runs pytest;
# arguments are passed to pytest (default: -q -ra -n 2 tests).  The database servers
# are throwaway instances started and stopped by the tests themselves
# (tests/servers.py); see tests/conftest.py for BAP_TEST_DIALECTS and
# BAP_TEST_POSTGRES_URL / BAP_TEST_MYSQL_URL.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup-lib.sh

dialects=",${BAP_TEST_DIALECTS:-sqlite,postgres,mysql},"
missing=()
if [[ $dialects == *,mysql,* && -z ${BAP_TEST_MYSQL_URL:-} ]] &&
   ! command -v mariadbd >/dev/null && [[ ! -x /usr/sbin/mariadbd ]]; then
    missing+=(mariadb-server)
fi
if [[ $dialects == *,postgres,* && -z ${BAP_TEST_POSTGRES_URL:-} ]] &&
   ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    missing+=(postgresql-15)
fi
# The browser test (tests/test_sse.py) drives Debian's headless chromium through its chromedriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    missing+=(chromium chromium-driver)
fi
# tests/test_server_js.py runs tests/js/sse_reader.mjs in Node (18 or later: built-in fetch, no packages).
if ! command -v node >/dev/null; then
    missing+=(nodejs)
fi
install_and_setup scripts/test.sh "${missing[@]}"

if (($# == 0)); then
    # Two pytest-xdist workers, each with its own throwaway servers: the suite waits on its
    # servers and its timers as much as it computes, so two share the 2-core CI machine well
    # (9 min 25 s in one process, 5 min 3 s in two, quiet). BAP_TEST_WORKERS=0: one process.
    set -- -q -ra -n "${BAP_TEST_WORKERS:-2}" tests
fi
exec python -m pytest "$@"

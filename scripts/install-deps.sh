#!/usr/bin/env bash
# Installs what tidelink's tests and demo need on a bare Debian machine: PostgreSQL 15
# (server binaries for throwaway clusters, psql), MariaDB (mariadbd, mariadb-install-db and
# the client for throwaway instances), curl, openssl (test certificates), and the build
# tools for the bundled librdkafka (with OpenSSL, for Kafka TLS and SASL/SCRAM). Then
# resolves Apache Kafka from Maven Central (scripts/install-kafka.sh; a JRE and Maven with
# apt-get where missing), or builds tansu with TIDELINK_BROKER=tansu; both cached.
# Idempotent and quiet when all is there.
set -euo pipefail
need=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
command -v psql >/dev/null || need+=(postgresql-client-15)
command -v mariadbd >/dev/null || need+=(mariadb-server)
command -v mariadb >/dev/null || need+=(mariadb-client)
command -v curl >/dev/null || need+=(curl)
command -v make >/dev/null || need+=(make)
command -v cc >/dev/null || need+=(gcc)
command -v runuser >/dev/null || need+=(util-linux)
command -v openssl >/dev/null || need+=(openssl)
command -v pkg-config >/dev/null || need+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  sudo_cmd=()
  [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "${TIDELINK_BROKER:-kafka}" = tansu ]; then
  "$(dirname "$0")/install-tansu.sh" >/dev/null
else
  "$(dirname "$0")/install-kafka.sh" >/dev/null
fi

#!/usr/bin/env bash
# Installs Debezium (the peer tidelink is compared with) once and caches it: Kafka Connect
# (connect-runtime, the JSON converter) and Debezium's PostgreSQL and MySQL source
# connectors, resolved from Maven Central with a small pom into
# ~/.cache/tidelink/debezium-<version>/lib: one classpath for `ConnectStandalone`.
# MariaDB: Debezium 3.x's MySQL connector refuses MariaDB 10.11 (it sends SHOW BINARY LOG
# STATUS) and debezium-connector-mariadb is not served, so lib-mariadb/ holds the last
# MySQL connector that reads MariaDB (2.6, `connector.adapter=mariadb`) on Kafka Connect
# 3.7, the version it was built on. The JDBC sink connector is added when Maven Central
# serves it (lib-jdbc/, its own classpath).
# A JRE and Maven are installed with apt-get where missing. Prints the directory on stdout.
# Safe to run concurrently: a lock serialises installs.
set -euo pipefail
DEBEZIUM_VERSION="${DEBEZIUM_VERSION:-3.6.1.Final}"
# Debezium 3.6.1 is built on Kafka 4.3.0: on connect-runtime 4.4.0 its tasks die with
# ClassNotFoundException org.apache.kafka.common.utils.Sanitizer (4.4 moved it). A Connect
# 4.3 worker talks to a 4.4 broker as any client does.
CONNECT_VERSION="${CONNECT_VERSION:-4.3.0}"
MARIADB_DEBEZIUM_VERSION="${MARIADB_DEBEZIUM_VERSION:-2.6.2.Final}"
MARIADB_CONNECT_VERSION="${MARIADB_CONNECT_VERSION:-3.7.0}"
CACHE_DIR="${TIDELINK_CACHE_DIR:-$HOME/.cache/tidelink}"
ROOT="$CACHE_DIR/debezium-$DEBEZIUM_VERSION"
MARK=.complete-4
# shellcheck source=scripts/java-cache.sh
. "$(dirname "$0")/java-cache.sh"
java_cache_begin debezium "$ROOT" "$MARK"

# pom ARTIFACT DEPENDENCIES…: a pom whose dependencies are `group:artifact:version` each.
pom() {
  local name="$1"
  shift
  echo '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
  echo "<groupId>dev.tidelink</groupId><artifactId>$name</artifactId><version>1</version><packaging>pom</packaging><dependencies>"
  local dependency
  for dependency in "$@"; do
    IFS=: read -r group artifact version <<<"$dependency"
    echo "<dependency><groupId>$group</groupId><artifactId>$artifact</artifactId><version>$version</version></dependency>"
  done
  echo '</dependencies></project>'
}

resolve() {
  local dir="$1"
  mvn -B -q -f "$dir/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$dir/lib" >&2
}

echo "resolving Debezium $DEBEZIUM_VERSION and Kafka Connect $CONNECT_VERSION from Maven Central into $ROOT (once)..." >&2
rm -rf "$ROOT.partial"
mkdir -p "$ROOT.partial/connect" "$ROOT.partial/mariadb" "$ROOT.partial/jdbc"
pom debezium-connect \
  "org.apache.kafka:connect-runtime:$CONNECT_VERSION" \
  "org.apache.kafka:connect-json:$CONNECT_VERSION" \
  "io.debezium:debezium-connector-postgres:$DEBEZIUM_VERSION" \
  "io.debezium:debezium-connector-mysql:$DEBEZIUM_VERSION" \
  "org.slf4j:slf4j-api:2.0.16" \
  "org.slf4j:slf4j-reload4j:2.0.16" \
  >"$ROOT.partial/connect/pom.xml"
resolve "$ROOT.partial/connect"
mv "$ROOT.partial/connect/lib" "$ROOT.partial/lib"
pom debezium-mariadb \
  "org.apache.kafka:connect-runtime:$MARIADB_CONNECT_VERSION" \
  "org.apache.kafka:connect-json:$MARIADB_CONNECT_VERSION" \
  "io.debezium:debezium-connector-mysql:$MARIADB_DEBEZIUM_VERSION" \
  "org.slf4j:slf4j-api:2.0.16" \
  "org.slf4j:slf4j-reload4j:2.0.16" \
  >"$ROOT.partial/mariadb/pom.xml"
resolve "$ROOT.partial/mariadb"
mv "$ROOT.partial/mariadb/lib" "$ROOT.partial/lib-mariadb"
pom debezium-jdbc \
  "org.apache.kafka:connect-runtime:$CONNECT_VERSION" \
  "org.apache.kafka:connect-json:$CONNECT_VERSION" \
  "io.debezium:debezium-connector-jdbc:$DEBEZIUM_VERSION" \
  "org.slf4j:slf4j-api:2.0.16" \
  "org.slf4j:slf4j-reload4j:2.0.16" \
  >"$ROOT.partial/jdbc/pom.xml"
if resolve "$ROOT.partial/jdbc"; then
  mv "$ROOT.partial/jdbc/lib" "$ROOT.partial/lib-jdbc"
else
  echo "io.debezium:debezium-connector-jdbc:$DEBEZIUM_VERSION does not resolve; no JDBC sink" >&2
fi
rm -rf "$ROOT.partial/connect" "$ROOT.partial/mariadb" "$ROOT.partial/jdbc"
java_cache_finish "$ROOT" "$MARK"

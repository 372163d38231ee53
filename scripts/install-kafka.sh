#!/usr/bin/env bash
# Installs Apache Kafka (the reference broker) once and caches it: the broker's jars are
# resolved from Maven Central with a small pom (`dependency:copy-dependencies`) into
# ~/.cache/tidelink/kafka-<version>/lib. A JRE and Maven are installed with apt-get
# where missing. Prints the directory (with lib/ inside) on stdout. Safe to run
# concurrently: a lock serialises installs.
set -euo pipefail
KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
CACHE_DIR="${TIDELINK_CACHE_DIR:-$HOME/.cache/tidelink}"
ROOT="$CACHE_DIR/kafka-$KAFKA_VERSION"
# The marker names the pom it was resolved from, so a changed pom resolves again.
MARK=.complete-2
# shellcheck source=scripts/java-cache.sh
. "$(dirname "$0")/java-cache.sh"
java_cache_begin kafka "$ROOT" "$MARK"

echo "resolving Apache Kafka $KAFKA_VERSION from Maven Central into $ROOT (once)..." >&2
rm -rf "$ROOT.partial"
mkdir -p "$ROOT.partial"
cat >"$ROOT.partial/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.tidelink</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.16</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>2.24.3</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.24.3</version></dependency>
  </dependencies>
</project>
POM
mvn -B -q -f "$ROOT.partial/pom.xml" dependency:copy-dependencies \
  -DincludeScope=runtime -DoutputDirectory="$ROOT.partial/lib" >&2
cat >"$ROOT.partial/log4j2.properties" <<'LOG'
status = warn
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.console.ref = console
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
LOG
java_cache_finish "$ROOT" "$MARK"

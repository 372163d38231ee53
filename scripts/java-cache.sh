# Shared by the scripts that install Java software from Maven Central into the cache
# (install-kafka.sh, install-debezium.sh). Source it, then:
#   java_cache_begin NAME ROOT MARK: take NAME's install lock, and exit printing ROOT if
#   ROOT/MARK shows a finished install; otherwise make sure a JRE and Maven are present
#   (apt-get where missing).
#   java_cache_finish ROOT MARK: move the finished ROOT.partial into place, print ROOT.

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}

java_cache_begin() {
  local name="$1" root="$2" mark="$3"
  mkdir -p "$(dirname "$root")"
  exec 9>"$(dirname "$root")/$name.lock"
  flock 9
  if [ -f "$root/$mark" ]; then
    echo "$root"
    exit 0
  fi
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null || apt_install maven
}

java_cache_finish() {
  local root="$1" mark="$2"
  touch "$root.partial/$mark"
  rm -rf "$root"
  mv "$root.partial" "$root"
  echo "$root"
}

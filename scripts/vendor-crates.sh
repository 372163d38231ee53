#!/usr/bin/env bash
# Regenerates vendor/rdkafka-sys, vendor/rdkafka and vendor/pgwire-replication: the
# crates.io rdkafka-sys (which bundles librdkafka's C source), rdkafka (the Rust client)
# and pgwire-replication (the PostgreSQL replication-protocol client), each checked
# against its published checksum, trimmed to what the build uses, with
# vendor/patches/<crate>/*.patch applied. The workspace's [patch.crates-io] points at
# the results.
#
# Why tidelink carries patched copies: the header of each patch explains it, and
# vendor/README.md lists them. To move to a newer version, change VERSION and SHA256 below
# (from Cargo.lock of an unpatched checkout, or crates.io), run this script, check that
# every patch still applies, and drop the patches upstream has taken.
set -euo pipefail

RDKAFKA_SYS_VERSION="4.10.0+2.12.1"
RDKAFKA_SYS_SHA256="e234cf318915c1059d4921ef7f75616b5219b10b46e9f3a511a15eb4b56a3f77"
RDKAFKA_VERSION="0.38.0"
RDKAFKA_SHA256="5f1856d72dbbbea0d2a5b2eaf6af7fb3847ef2746e883b11781446a51dbc85c0"
PGWIRE_REPLICATION_VERSION="0.5.0"
PGWIRE_REPLICATION_SHA256="3a50650abe90031924c509ad2a3ac1e8f1cb8387dceb0fa4c1db382ea36f6b22"

root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# download CRATE VERSION SHA256: unpacks the checked crate; prints where.
download() {
    local crate="$1" version="$2" sha256="$3"
    local url="https://static.crates.io/crates/$crate/$crate-${version/+/%2B}.crate"
    echo "downloading $url" >&2
    curl -sSfL -o "$work/$crate.tar.gz" "$url"
    echo "$sha256  $work/$crate.tar.gz" | sha256sum -c --quiet -
    tar -xzf "$work/$crate.tar.gz" -C "$work"
    echo "$work/$crate-$version"
}

# patch_into_vendor CRATE SRC: applies vendor/patches/CRATE/*.patch to SRC and moves it to vendor/CRATE.
patch_into_vendor() {
    local crate="$1" src="$2" patch count=0
    for patch in "$root/vendor/patches/$crate"/*.patch; do
        [ -e "$patch" ] || continue
        echo "applying $crate/$(basename "$patch")"
        patch -s -p1 -d "$src" < "$patch"
        count=$((count + 1))
    done
    rm -rf "${root:?}/vendor/$crate"
    mv "$src" "$root/vendor/$crate"
    echo "vendor/$crate is $crate $(basename "$src" | sed "s/^$crate-//") with $count patch(es)"
}

# librdkafka: only the library is built (`make libs`: src and src-cpp, configured by
# mklove); the test suite, examples, Windows and packaging trees are not, except the
# version helper the Makefile calls.
src="$(download rdkafka-sys "$RDKAFKA_SYS_VERSION" "$RDKAFKA_SYS_SHA256")"
lib="$src/librdkafka"
mv "$lib/packaging/get_version.py" "$work/get_version.py"
rm -rf "$lib/tests" "$lib/examples" "$lib/win32" "$lib/packaging" "$lib/debian" \
    "$src/simple_producer.rs"
mkdir -p "$lib/packaging"
mv "$work/get_version.py" "$lib/packaging/get_version.py"
patch_into_vendor rdkafka-sys "$src"

# The Rust client, whole (about 0.6 MB; its manifest names its tests and examples).
src="$(download rdkafka "$RDKAFKA_VERSION" "$RDKAFKA_SHA256")"
patch_into_vendor rdkafka "$src"

# The replication client, whole (about 0.6 MB).
src="$(download pgwire-replication "$PGWIRE_REPLICATION_VERSION" "$PGWIRE_REPLICATION_SHA256")"
patch_into_vendor pgwire-replication "$src"

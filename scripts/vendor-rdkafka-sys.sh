#!/usr/bin/env bash
# Regenerates vendor/rdkafka-sys: the crates.io rdkafka-sys (which bundles librdkafka's
# C source), checked against its published checksum, trimmed to what its build uses, with
# vendor/patches/*.patch applied. The workspace's [patch.crates-io] points at the result.
#
# Why tidelink carries a patched librdkafka: vendor/patches/ explains each patch. To move
# to a newer rdkafka-sys, change VERSION and SHA256 (from Cargo.lock of an unpatched
# checkout or crates.io), run this script, check that every patch still applies, and drop
# the patches upstream has taken.
set -euo pipefail

VERSION="4.10.0+2.12.1"
SHA256="e234cf318915c1059d4921ef7f75616b5219b10b46e9f3a511a15eb4b56a3f77"

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/vendor/rdkafka-sys"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

url="https://static.crates.io/crates/rdkafka-sys/rdkafka-sys-${VERSION/+/%2B}.crate"
echo "downloading $url"
curl -sSfL -o "$work/crate.tar.gz" "$url"
echo "$SHA256  $work/crate.tar.gz" | sha256sum -c --quiet -
tar -xzf "$work/crate.tar.gz" -C "$work"
src="$work/rdkafka-sys-$VERSION"

# Only the library is built (`make libs`: src and src-cpp, configured by mklove); the
# test suite, examples, Windows and packaging trees are not, except the version helper
# the Makefile calls.
lib="$src/librdkafka"
mv "$lib/packaging/get_version.py" "$work/get_version.py"
rm -rf "$lib/tests" "$lib/examples" "$lib/win32" "$lib/packaging" "$lib/debian" \
    "$src/simple_producer.rs"
mkdir -p "$lib/packaging"
mv "$work/get_version.py" "$lib/packaging/get_version.py"

for patch in "$root"/vendor/patches/*.patch; do
    echo "applying $(basename "$patch")"
    patch -s -p1 -d "$src" < "$patch"
done

rm -rf "$dest"
mv "$src" "$dest"
echo "vendor/rdkafka-sys is rdkafka-sys $VERSION with $(ls "$root"/vendor/patches/*.patch | wc -l) patch(es)"

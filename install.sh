#!/bin/sh
# Installs memtrack: PREFIX/bin/memtrack and PREFIX/lib/memtrack/libmemtrack.so, the library
# the command preloads into the programs it runs (it looks for it there), and the Python region
# marks in PREFIX/lib/memtrack/python (`memtrack run` puts them on PYTHONPATH).
#
#   ./install.sh [--no-build] [PREFIX]     PREFIX defaults to ~/.local
#
# --no-build installs what target/release already holds (from `cargo build --release`).
set -eu

usage() {
    echo "usage: $0 [--no-build] [PREFIX]   (PREFIX defaults to \$HOME/.local)" >&2
    exit 2
}

build=1
prefix=
for arg in "$@"; do
    case $arg in
    --no-build) build=0 ;;
    -h | --help) usage ;;
    -*) echo "$0: unknown option $arg" >&2; usage ;;
    *) [ -z "$prefix" ] || usage; prefix=$arg ;;
    esac
done
[ -n "$prefix" ] || prefix=${HOME:?HOME is not set; give a PREFIX}/.local

src=$(cd "$(dirname "$0")" && pwd)
if [ "$build" = 1 ]; then
    (cd "$src" && cargo build --release -p memtrack -p memtrack-preload)
fi
target=${CARGO_TARGET_DIR:-$src/target}/release
for f in memtrack libmemtrack.so; do
    if [ ! -f "$target/$f" ]; then
        echo "$0: $target/$f is missing; run without --no-build, or cargo build --release first" >&2
        exit 1
    fi
done

mkdir -p "$prefix/bin" "$prefix/lib/memtrack"
# Into place through a temporary name: a memtrack running from PREFIX keeps its old file.
install -m 755 "$target/memtrack" "$prefix/bin/.memtrack.new"
mv -f "$prefix/bin/.memtrack.new" "$prefix/bin/memtrack"
install -m 755 "$target/libmemtrack.so" "$prefix/lib/memtrack/.libmemtrack.so.new"
mv -f "$prefix/lib/memtrack/.libmemtrack.so.new" "$prefix/lib/memtrack/libmemtrack.so"

# The Python package (`import memtrack`: region marks, Tracker), which `memtrack run` puts on
# PYTHONPATH.
mkdir -p "$prefix/lib/memtrack/python/memtrack"
for f in "$src"/python/memtrack/*.py; do
    install -m 644 "$f" "$prefix/lib/memtrack/python/memtrack/"
done

echo "installed $prefix/bin/memtrack, $prefix/lib/memtrack/libmemtrack.so and $prefix/lib/memtrack/python"
case ":${PATH:-}:" in
*":$prefix/bin:"*) ;;
*) echo "note: $prefix/bin is not on your PATH; add it, e.g.: export PATH=\"$prefix/bin:\$PATH\"" ;;
esac

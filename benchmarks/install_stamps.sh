#!/bin/sh
# Install Debian's tuxpaint-stamps-default: the photo cut-outs the composite benchmark
# (`himir bench build`) pastes into scenes. The stamps are GPL-2; this project ships none
# of them and reads them from the installed package at run time.
set -eu

PACKAGE=tuxpaint-stamps-default
STAMPS_DIR=/usr/share/tuxpaint/stamps

if [ -d "$STAMPS_DIR" ] && find "$STAMPS_DIR" -name '*.png' -print -quit | grep -q .; then
    echo "$PACKAGE is already installed ($STAMPS_DIR)."
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get not found: install the Tux Paint stamps ($PACKAGE) with your system's" >&2
    echo "package manager, then pass their folder to the benchmark (stamps_dir / --stamps-dir)." >&2
    exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "Run as root, or install the stamps yourself:"
    echo "    sudo apt-get update && sudo apt-get install -y $PACKAGE"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "$PACKAGE"
echo "Installed $PACKAGE into $STAMPS_DIR."

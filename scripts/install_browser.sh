#!/bin/sh
# Install Debian's chromium + chromium-driver for tests/test_web_page.py (headless browser test).
# Idempotent and non-interactive: does nothing when /usr/bin/chromium and /usr/bin/chromedriver
# exist; otherwise runs apt-get (as root, or through sudo when available), updating the package
# lists first only when the packages cannot be found in them.
set -eu

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver
PACKAGES="chromium chromium-driver"

if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo -n"
else
    echo "install_browser.sh: $CHROMIUM or $CHROMEDRIVER is missing and this is not root;" >&2
    echo "  run as root: apt-get install -y $PACKAGES" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0"

# Update the lists only when apt does not know a candidate for every package (fresh image).
needs_update=0
for pkg in $PACKAGES; do
    candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
        needs_update=1
    fi
done
if [ "$needs_update" -eq 1 ]; then
    echo "install_browser.sh: apt-get update" >&2
    $APT update
fi

echo "install_browser.sh: apt-get install $PACKAGES" >&2
$APT install $PACKAGES

for f in "$CHROMIUM" "$CHROMEDRIVER"; do
    if [ ! -x "$f" ]; then
        echo "install_browser.sh: $f still missing after apt-get install" >&2
        exit 1
    fi
done
"$CHROMIUM" --version 2>/dev/null || true
"$CHROMEDRIVER" --version

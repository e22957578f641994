#!/usr/bin/env bash
# Headless rendering needs EGL + Mesa (Debian: libegl1 libegl-mesa0 libgl1-mesa-dri).
# Installed here when missing and we are root with apt-get; otherwise say what to install.
set -u
if ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' && ls /usr/lib/*/dri/*swrast* >/dev/null 2>&1; then
  exit 0
fi
pkgs="libegl1 libegl-mesa0 libgl1-mesa-dri"
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing headless rendering packages: $pkgs"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null) \
    || echo "warning: could not install $pkgs; videos will be unavailable (everything else works)"
else
  echo "note: headless rendering (videos) needs: $pkgs (not installed; run as root or install them)"
fi
exit 0

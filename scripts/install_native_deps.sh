#!/usr/bin/env bash
# Installs the Debian packages the native core builds with (cmake, g++, nlohmann-json3-dev,
# libssl-dev, libfftw3-dev), only those missing; does nothing when all are present.
set -euo pipefail
packages=(cmake g++ nlohmann-json3-dev libssl-dev libfftw3-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
$sudo apt-get update -q
$sudo apt-get install -y -q "${missing[@]}"

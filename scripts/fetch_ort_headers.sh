#!/bin/sh
# Fetch ONNX Runtime's C/C++ API headers from Debian 13 (trixie)'s libonnxruntime-dev into DEST,
# without touching the system's apt setup: a private sources list, lists and cache under DEST,
# the package downloaded (never installed) and unpacked with dpkg-deb -x.
#
# usage: scripts/fetch_ort_headers.sh DEST
# result: DEST/include/onnxruntime/onnxruntime_cxx_api.h (and the other headers)
# Nothing is done when the headers are already there.
set -eu

dest=${1:?usage: fetch_ort_headers.sh DEST}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
header="$dest/include/onnxruntime/onnxruntime_cxx_api.h"
[ -f "$header" ] && exit 0

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "fetch_ort_headers: '$tool' is missing: the headers come from Debian's libonnxruntime-dev package, which needs apt-get and dpkg-deb" >&2
        exit 1
    }
done

# The mirror the system already uses (deb822 .sources files or a one-line sources.list).
mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -m1 '/debian/\?$' || true)
[ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' | grep -m1 '/debian/\?$' || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

work="$dest/apt"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
cat > "$work/sources.list" <<LIST
deb [signed-by=$keyring] $mirror trixie main
LIST
apt_opts="-o Dir::Etc::SourceList=$work/sources.list -o Dir::Etc::SourceParts=/nonexistent \
 -o Dir::State::Lists=$work/lists -o Dir::Cache=$work/cache -o Dir::State::Status=/var/lib/dpkg/status \
 -o APT::Get::List-Cleanup=false -o Debug::NoLocking=true -qq"

# shellcheck disable=SC2086
if ! apt-get $apt_opts update >"$work/update.log" 2>&1; then
    echo "fetch_ort_headers: could not read Debian trixie's package list from $mirror (see $work/update.log)" >&2
    exit 1
fi
# shellcheck disable=SC2086
if ! (cd "$work/debs" && apt-get $apt_opts download libonnxruntime-dev >"$work/download.log" 2>&1); then
    echo "fetch_ort_headers: could not download Debian trixie's libonnxruntime-dev from $mirror (see $work/download.log)" >&2
    exit 1
fi
deb=$(ls "$work/debs"/libonnxruntime-dev_*.deb | head -n1)
rm -rf "$work/root"
dpkg-deb -x "$deb" "$work/root"
mkdir -p "$dest/include"
rm -rf "$dest/include/onnxruntime"
cp -r "$work/root/usr/include/onnxruntime" "$dest/include/onnxruntime"
[ -f "$header" ] || { echo "fetch_ort_headers: $deb holds no onnxruntime_cxx_api.h" >&2; exit 1; }
basename "$deb" > "$dest/include/onnxruntime/SOURCE_PACKAGE"

#!/usr/bin/env bash
# Unpack onnxruntime's C/C++ headers from Debian's libonnxruntime-dev (trixie, 1.21) into
# ${XDG_CACHE_HOME:-~/.cache}/mp4sr-rt/onnxruntime/include, without installing anything: a private
# apt configuration reads trixie's package list and downloads the one .deb (85 kB), which only
# dpkg -x unpacks. The library itself comes from the onnxruntime Python wheel (build.sh).
set -euo pipefail
dest=${XDG_CACHE_HOME:-$HOME/.cache}/mp4sr-rt/onnxruntime
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial"
if [ -f "$dest/include/onnxruntime_c_api.h" ]; then echo "$dest/include"; exit 0; fi
# The machine's own Debian mirror, asked for the newer suite that carries the headers.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { echo "no Debian mirror configured in /etc/apt" >&2; exit 1; }
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
          -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" -qq update
(cd "$work" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev)
dpkg -x "$work"/libonnxruntime-dev_*.deb "$work/root"
rm -rf "$dest/include"
mkdir -p "$dest"
cp -r "$work/root/usr/include/onnxruntime" "$dest/include"
echo "$dest/include"

#!/usr/bin/env bash
# Unpack FAISS's C++ headers and static library (Debian's libfaiss-dev, 1.7.3) and the OpenBLAS
# it links against into ${XDG_CACHE_HOME:-~/.cache}/mp4sr-rt/faiss, without installing anything:
# apt-get download fetches the .debs from the machine's configured Debian mirror and dpkg -x
# unpacks them. Prints the folder (build.sh reads it as FAISS_ROOT).
set -euo pipefail
dest=${XDG_CACHE_HOME:-$HOME/.cache}/mp4sr-rt/faiss
if [ -f "$dest/usr/lib/x86_64-linux-gnu/libfaiss.a" ]; then echo "$dest"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get -o APT::Sandbox::User=root -qq download \
    libfaiss-dev libopenblas-dev libopenblas-pthread-dev libopenblas0-pthread libgfortran5)
rm -rf "$dest"
mkdir -p "$dest"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$dest"; done
ln -sf libgfortran.so.5 "$dest/usr/lib/x86_64-linux-gnu/libgfortran.so"
echo "$dest"

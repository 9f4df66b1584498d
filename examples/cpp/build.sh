#!/usr/bin/env bash
# Build the scorer example against onnxruntime's C/C++ API:  examples/cpp/build.sh [OUT_DIR]
#   ORT_INCLUDE_DIR  folder with onnxruntime_cxx_api.h (default: what fetch_ort_headers.sh unpacked)
#   ORT_LIB          libonnxruntime.so.* (default: the one inside the Python onnxruntime wheel)
#   FAISS_ROOT       what fetch_faiss.sh unpacked: also builds ann_search (the approximate index)
# Headers older than the library are fine: the C API is fetched by version (GetApi(ORT_API_VERSION)).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
include=${ORT_INCLUDE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mp4sr-rt/onnxruntime/include}
lib=${ORT_LIB:-$(${PYTHON:-python3} -c 'import glob, os, onnxruntime as o; print(glob.glob(os.path.join(os.path.dirname(o.__file__), "capi", "libonnxruntime.so.*"))[0])')}
test -f "$include/onnxruntime_cxx_api.h" || { echo "no onnxruntime_cxx_api.h in $include (run fetch_ort_headers.sh)" >&2; exit 1; }
mkdir -p "$out"
# The library's SONAME is libonnxruntime.so.1: link through a link of that name next to the
# program, found at run time through the $ORIGIN rpath.
ln -sf "$lib" "$out/libonnxruntime.so.1"
g++ -std=c++17 -O2 -Wall -Wextra -I"$include" "$here/score.cc" "$out/libonnxruntime.so.1" \
    -Wl,-rpath,'$ORIGIN' -o "$out/score"
echo "$out/score"
if [ -n "${FAISS_ROOT:-}" ]; then
  lib=$FAISS_ROOT/usr/lib/x86_64-linux-gnu
  g++ -std=c++17 -O2 -Wall -fopenmp -I"$FAISS_ROOT/usr/include" "$here/ann_search.cc" "$lib/libfaiss.a" \
      -L"$lib/openblas-pthread" -lopenblas -L"$lib" -lgfortran \
      -Wl,--disable-new-dtags -Wl,-rpath,"$lib/openblas-pthread" -Wl,-rpath,"$lib" -o "$out/ann_search"
  echo "$out/ann_search"
fi

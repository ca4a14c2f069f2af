#!/usr/bin/env bash
# Build llama.cpp's own C++ server (`llama-server`: continuous batching over `--parallel` slots)
# from the llama.cpp source tree that llama-cpp-python's source distribution carries, so the
# server and the Python bindings are the same llama.cpp. The sdist is pinned by version and
# sha256 (checked before anything is built); the binary is statically linked, portable
# (-DGGML_NATIVE=OFF) and installed as <venv>/bin/llama-server.
#
#     bash tools/build_llama_server.sh .venv      # 10-40 minutes on 2 cores, once per machine
#
# The built binary is kept in ~/.cache/textbook-pipeline (like pip's wheel cache), keyed by the
# sdist's sha256 and the build flags, so a fresh clone on the same machine installs it at once.
set -euo pipefail
VENV=${1:-.venv}
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
FLAGS="-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON"
KEY=$(printf '%s %s' "$SHA256" "$FLAGS" | sha256sum | cut -c1-16)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/textbook-pipeline/llama-server-$VERSION-$KEY"
if [ ! -x "$CACHE/llama-server" ]; then
  WORK=${LLAMA_SERVER_BUILD_DIR:-$(mktemp -d)}
  mkdir -p "$WORK"
  SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$SDIST" ]; then
    "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION"
  fi
  echo "$SHA256  $SDIST" | sha256sum -c --quiet - || { echo "llama-cpp-python $VERSION sdist: sha256 mismatch" >&2; exit 1; }
  tar -xzf "$SDIST" -C "$WORK"
  SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
  # shellcheck disable=SC2086
  cmake -S "$SRC" -B "$WORK/build" $FLAGS >"$WORK/cmake-configure.log"
  echo "building llama-server (log: $WORK/cmake-build.log)" >&2
  cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >"$WORK/cmake-build.log"
  mkdir -p "$CACHE"
  install -m 755 "$WORK/build/bin/llama-server" "$CACHE/llama-server.tmp"
  mv "$CACHE/llama-server.tmp" "$CACHE/llama-server"
fi
install -m 755 "$CACHE/llama-server" "$VENV/bin/llama-server"
"$VENV/bin/llama-server" --version 2>&1 | grep -m1 '^version' || { echo "llama-server does not run" >&2; exit 1; }

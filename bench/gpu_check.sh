#!/usr/bin/env bash
# The GPU check (issue 14), for a one-GPU machine with no network: the project's tree plus the
# bitsandbytes wheel it needs (about 41 MB; torch, transformers, peft and accelerate are expected
# there), within 10 minutes. Prepare the wheel once where pip works:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# then run `bash bench/gpu_check.sh` there (carrying .whl). It writes one JSON object to
# $OUT/gpu_check.json (or bench/results/gpu_check.json without $OUT) and prints it.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
dest="${OUT:-bench/results}/gpu_check.json"
mkdir -p "$(dirname "$dest")"
timeout 540 python3 bench/gpu_check.py "$@" | tee /tmp/gpu_check.log
tail -n 1 /tmp/gpu_check.log > "$dest"
echo "wrote $dest"

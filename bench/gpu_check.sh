#!/usr/bin/env bash
# The GPU check, for a one-GPU machine with no network: the project's tree plus the
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
# stdout (its last line is the JSON) and stderr (progress, errors) each to the console and a file.
timeout 540 python3 bench/gpu_check.py "$@" 2> >(tee /tmp/gpu_check.err >&2) | tee /tmp/gpu_check.log
status=${PIPESTATUS[0]}
wait 2>/dev/null || true  # the stderr tee (a process substitution) has written all of it
# gpu_check.py ends with one JSON line whatever failed inside it; a timeout (124), a kill (137) or a crash
# before it started (an import) leaves none: then the file still gets one JSON object, saying so.
last=$(tail -n 1 /tmp/gpu_check.log)
if python3 -c 'import json, sys; assert isinstance(json.loads(sys.argv[1]), dict)' "$last" 2>/dev/null; then
  printf '%s\n' "$last" > "$dest"
else
  python3 -c 'import json, sys; print(json.dumps({"error": "gpu_check.py exited with code %s before writing its JSON line (124: timeout)" % sys.argv[1], "log_tail": open("/tmp/gpu_check.err", errors="replace").read()[-2000:]}))' "$status" > "$dest"
fi
echo "wrote $dest"
exit "$status"

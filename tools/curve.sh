#!/usr/bin/env bash
# pass@1 against the number of curated training exercises, on the showcase's data and
# evaluation: phase 2 again on nested seeded samples of its exercises (finetune.max_records), each
# scored on all 164 problems like the showcase's own fine-tuned model. Run after tools/showcase.sh.
#   tools/curve.sh            # samples of 12 and 24 exercises (about 10 minutes each on 2 cores)
#   tools/curve.sh 6 12 24    # other sizes
# Writes eval/showcase/curve-<n>/ (metrics.json, per_problem.json, samples) and eval/showcase/curve.json
# + curve.md: every point, the showcase's after-phase-1 model (0 exercises) and its full set included.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/showcase_env.sh
sizes=("${@:-12 24}")
for n in ${sizes[@]}; do
  echo "== $n exercises ($(date +%H:%M:%S))"
  .venv/bin/textbook finetune -q "${SET[@]}" --set finetune.max_records=$n --set finetune.output_dir=$D/curve-$n
  .venv/bin/textbook evaluate -q "${SET[@]}" --set finetune.output_dir=$D/curve-$n \
      --set 'evaluate.models=[finetuned]' --set evaluate.output_dir=eval/showcase/curve-$n
done
.venv/bin/python - "${sizes[@]}" <<'PY'
import json, sys
from pathlib import Path

def point(label, n, m):
    return {"model": label, "exercises": n, "pass@1": m["pass@1"], "ci95": [m["pass@1_ci95_low"], m["pass@1_ci95_high"]],
            "problems_solved": m["problems_solved"]}

show = json.loads(Path("eval/showcase/metrics.json").read_text())["humaneval"]
full = json.loads(Path("data/showcase/finetune/metrics.json").read_text())
first = "pretrained" if "pretrained" in show else "base"
points = [point(first, 0, show[first])]
for n in sorted({int(x) for a in sys.argv[1:] for x in a.split()}):
    m = json.loads(Path(f"eval/showcase/curve-{n}/metrics.json").read_text())["humaneval"]
    used = json.loads(Path(f"data/showcase/curve-{n}/metrics.json").read_text()).get("records_used", n)
    points.append(point("finetuned", used, m["finetuned"]))
points.append(point("finetuned", full.get("records_used"), show["finetuned"]))
out = {"benchmark": "HumanEval", "subset": show["subset"], "harness": show.get("harness"), "points": points}
Path("eval/showcase/curve.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
rows = [f"| {p['exercises']} | {100 * p['pass@1']:.1f} | {100 * p['ci95'][0]:.1f} - {100 * p['ci95'][1]:.1f} | "
        f"{p['problems_solved']} |" for p in points]
Path("eval/showcase/curve.md").write_text(
    f"# pass@1 against curated training exercises\n\nHumanEval {show['subset']}, greedy pass@1, harness "
    f"{show.get('harness')}; 0 = the model before phase 2 ({first}); nested seeded samples of the showcase's "
    "exercises (`tools/curve.sh`).\n\n| exercises | pass@1 (%) | 95% interval | solved |\n|---|---|---|---|\n"
    + "\n".join(rows) + "\n")
print(json.dumps(out))
PY

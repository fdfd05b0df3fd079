#!/bin/bash
# The reference report's SmolLM2 runs (issue 33's edition), as one queue that WORKERS jobs drain
# (one per core, one torch thread each). Every run resumes, so this script is also how a stopped
# edition goes on: run it again. State lives in $QUEUE (results/logs/queue by default):
#   jobs      the edition's runs, one per line: <log name> <pipeline.evaluate overrides...>
#   pending   the runs not yet taken (rebuilt from jobs minus done at each start)
#   done      the runs finished (with the time); failed: those that exited non-zero
#   worktree  the checkout each run starts from, read at each run's start: a clean worktree at
#             a named commit (git worktree add --detach ../run HEAD), so every run.json names a
#             commit without uncommitted changes; defaults to this checkout. With a worktree,
#             export ROME_RESULTS, ROME_CACHE and ROME_DATA first, so that every run reads and
#             writes the main checkout's results, cache and data, not the worktree's
# Logs: $RESULTS/logs/evaluate/<log name>.log, appended to by each start (a run's speed over
# sessions stays readable there).
# Between checkouts (each session of this project starts from a fresh clone), the runs' progress
# travels in the repository: `save` copies the edition's run directories' small files (cases,
# summaries, run.json; pipeline.app.snapshot) and the queue's jobs and done lists to $EDITION,
# to be committed; a start restores from there whatever the results directory lacks, so every
# run resumes where the saved copy left it (a sequential run, whose weights are not saved,
# makes its edits again and keeps the checkpoints it scored).
# Usage: scripts/reference_edition.sh [WORKERS] | scripts/reference_edition.sh save
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=${ROME_RESULTS:-$ROOT/results}
QUEUE=${QUEUE:-$RESULTS/logs/queue}
PY=${PY:-$ROOT/.venv/bin/python}
EDITION=${EDITION:-$ROOT/reports/default_smollm2/edition}
snapshot() { (cd "$ROOT" && "${SNAPSHOT_PY:-$ROOT/.venv/bin/python}" -m pipeline.app.snapshot "$@"); }
RUNS=(counterfact-first1000 zsre counterfact-union)  # the edition's data, under evaluate/<model>
RUNS=("${RUNS[@]/#/$RESULTS/evaluate/smollm2-135m/}")
if [ "${1:-}" = save ]; then
  snapshot save "$RESULTS" "$EDITION" "${RUNS[@]}"
  mkdir -p "$EDITION/queue"
  for list in jobs done; do [ ! -f "$QUEUE/$list" ] || cp "$QUEUE/$list" "$EDITION/queue/"; done
  exit 0
fi
WORKERS=${1:-2}
mkdir -p "$QUEUE" "$RESULTS/logs/evaluate"
if [ -d "$EDITION" ]; then
  snapshot restore "$EDITION/evaluate" "$RESULTS/evaluate"
  for list in jobs done; do
    [ -f "$QUEUE/$list" ] || [ ! -f "$EDITION/queue/$list" ] || cp "$EDITION/queue/$list" "$QUEUE/"
  done
fi
export ROME_RESULTS=$RESULTS ROME_WANDB_MODE=${ROME_WANDB_MODE:-disabled} OMP_NUM_THREADS=1
[ -f "$QUEUE/worktree" ] || echo "$ROOT" > "$QUEUE/worktree"
if [ ! -f "$QUEUE/jobs" ]; then
  full="data=counterfact-first1000"
  {
    for e in none memit ft-l emmet alphaedit ft kn r-rome rome; do  # Table 4, GE on 200
      echo "first1000-$e editor=$e $full eval.generation_cases=200"
    done
    for e in none rome memit r-rome emmet alphaedit ft; do echo "zsre-$e editor=$e data=zsre"; done
    # Many edits in one model: the later case of each pair filling one prompt with two targets
    # is left out, so one case more is loaded per pair (docs/evaluation.md).
    union="data=counterfact-union eval.contradictions=drop_later"
    for e in memit emmet alphaedit; do  # mass editing, N = 1 to 1,000
      echo "mass-$e editor=$e $union data.limit=1001 eval.mode=mass 'eval.mass_sizes=[1,10,100,1000]'"
    done
    for e in alphaedit memit emmet; do  # AlphaEdit's setting: 2,000 edits in batches of 100
      echo "sequential-$e editor=$e $union data.limit=2003 eval.mode=sequential" \
        "eval.sequential_batch=100 'eval.checkpoints=[500,1000,1500,2000]' eval.generation_cases=100"
    done
    # ROME's mass curve stays the reduced-schema one (counterfact-easyedit, the report's second
    # mass data): its 1,000 edits, written one after another in one pass that cannot resume,
    # take about 4 hours, longer than a session here.
  } > "$QUEUE/jobs"
fi
touch "$QUEUE/done"
grep -v -x -F -f <(cut -d" " -f2- "$QUEUE/done") "$QUEUE/jobs" > "$QUEUE/pending" || true
echo "$(wc -l < "$QUEUE/pending") of $(wc -l < "$QUEUE/jobs") runs to go; $WORKERS workers"

worker() {
  while true; do
    line=$(flock "$QUEUE/lock" bash -c "head -n1 '$QUEUE/pending'; sed -i 1d '$QUEUE/pending'")
    [ -z "$line" ] && break
    name=${line%% *}
    args=${line#* }
    tree=$(cat "$QUEUE/worktree")
    echo "$(date -Is) start ($tree at $(git -C "$tree" rev-parse --short HEAD)) $line" \
      >> "$QUEUE/running-$1"
    echo "$(date -Is) start at $(git -C "$tree" rev-parse --short HEAD)" >> "$RESULTS/logs/evaluate/$name.log"
    if (cd "$tree" && eval "$PY" -m pipeline.evaluate "$args" \
        >> "$RESULTS/logs/evaluate/$name.log" 2>&1); then
      echo "$(date -Is) $line" >> "$QUEUE/done"
    else
      echo "$(date -Is) rc=$? $line" >> "$QUEUE/failed"
    fi
  done
}

for w in $(seq 1 "$WORKERS"); do
  worker "$w" > "$QUEUE/worker-$w.out" 2>&1 &
done
wait

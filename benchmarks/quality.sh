#!/usr/bin/env bash
# The quality report: MP4SR against its baselines at the demo preset's full, early-stopped schedule.
#
#   bash benchmarks/quality.sh [OUT]      # OUT: results directory (default mp4sr-bench); resumable
#
# 1. the demo data, 3 seeds, both settings -> docs/results.md
# 2. the other data configurations (benchmarks/quality_data.py), 1 seed -> docs/results-<config>.md
# 3. ablations of the fine-tuning defaults on the demo data, 1 seed -> docs/results-ablations.md
# 4. the large-catalogue training path (sampled softmax) against the full one, 3 seeds, normal
#    setting -> docs/results-sampled.md
# 5. temperature, dropout and pre-training length, 1 seed, normal setting -> docs/results-ablations-schedule.md,
#    docs/results-ablations-pretrain-lr.md
# 6. the fine-tuning schedule (lr 3e-4 for up to 40 epochs) for MP4SR and for both SASRec baselines:
#    the demo data, 3 seeds, normal (docs/results-finetune-lr.md) and cold-start
#    (docs/results-finetune-lr-cold-start.md); the other data configurations, 1 seed, normal
#    (docs/results-finetune-lr-<config>.md)
# 7. candidate ID rows of their own (untied, residual) for MP4SR and for both SASRec baselines, the demo
#    data, 1 seed, both settings -> docs/results-ablations-candidate-rows.md; the same on the other data
#    configurations, normal setting; then the generator's own probabilities beside the trained models
#    (benchmarks/oracle.py) -> docs/bench/oracle-demo.txt and docs/bench/cold-neighbours.jsonl; width
#    128 -> docs/results-ablations-width.md
# 8. the pre-trained encoders' learning rate in fine-tuning (train.finetune_encoder_lr, 0 to 0.3 x lr),
#    1 seed, both settings -> docs/results-ablations-encoder-lr*.md, docs/bench/encoder-lr-cold.jsonl;
#    0.1 x lr for up to 40 epochs, 3 seeds, normal -> docs/results-finetune-encoder-lr.md
# 9. popularity smoothing (train.popularity_smoothing) for MP4SR and for both SASRec baselines, normal
#    setting, 1 seed -> docs/results-ablations-popularity-smoothing.md, 3 seeds at 0.3 ->
#    docs/results-popularity-smoothing.md
# Each step runs its two settings in two processes of one thread each (a 2-core machine); a rerun
# skips every finished run. Steps 1 and 2 take about 1.5 hours on a 2-core CPU, step 3 about 40 minutes,
# step 4 about 25, step 5 about 30, step 6 about 2 hours, step 7 about 1.5 hours, step 8 about 1.5 hours, step 9 about 1 hour.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-mp4sr-bench}
BIN=${BIN:-.venv/bin}
BASE=mp4sr,sasrec,sasrec-features,mp4sr-no-pretrain

bench() {  # bench OUT_DIR REPORT ARGS...: both settings in parallel, then the report over both
  local out=$1 report=$2
  shift 2
  "$BIN/mp4sr-rt" benchmark --out "$out" --threads 1 --quiet --settings normal "$@" </dev/null >"$out.normal.log" 2>&1 &
  local normal=$!
  "$BIN/mp4sr-rt" benchmark --out "$out" --threads 1 --quiet --settings cold-start "$@" </dev/null >"$out.cold.log" 2>&1
  wait "$normal"
  "$BIN/mp4sr-rt" benchmark --out "$out" --quiet --report "$report" "$@" </dev/null
}

mkdir -p "$OUT"
bench "$OUT/demo" docs/results.md --models "$BASE" --seeds 3
"$BIN/python" benchmarks/quality_data.py "$OUT/data" | while read -r name data features; do
  models=mp4sr,sasrec,sasrec-features
  [ "$name" = text-only ] && models=$models,pretrain-absent  # the absent-modality handling, on and off
  bench "$OUT/$name" "docs/results-$name.md" --models "$models" --seeds 1 --data "$data" --features "$features"
done
bench "$OUT/demo" docs/results-ablations.md --seeds 1 \
  --models mp4sr,ids-paper,ids-scale-1,ids-no-dropout,ids-dropout-0.5,ids-no-projection
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings normal --seeds 3 \
  --models mp4sr,sampled-softmax --report docs/results-sampled.md </dev/null
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings normal --seeds 1 \
  --models mp4sr,tau-0.1,dropout-0.5,pretrain-30 --report docs/results-ablations-schedule.md </dev/null
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings normal --seeds 1 \
  --models mp4sr,pretrain-3,finetune-lr-3e-4 --report docs/results-ablations-pretrain-lr.md </dev/null
LR=mp4sr,finetune-lr-3e-4,sasrec,sasrec-features,sasrec-lr-3e-4,sasrec-features-lr-3e-4
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings cold-start --seeds 3 \
  --models mp4sr,finetune-lr-3e-4 --report docs/results-finetune-lr-cold-start.md </dev/null &
cold=$!
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings normal --seeds 3 \
  --models "$LR" --report docs/results-finetune-lr.md </dev/null
wait "$cold"
for name in text-only small-latent; do
  "$BIN/mp4sr-rt" benchmark --out "$OUT/$name" --quiet --threads 1 --settings normal --seeds 1 --models "$LR" \
    --data "$OUT/data/$name/data" --features "$OUT/data/$name/features.safetensors" \
    --report "docs/results-finetune-lr-$name.md" </dev/null
done
CANDIDATE=mp4sr,sasrec,sasrec-features,ids-untied,ids-residual,sasrec-untied,sasrec-features-untied
bench "$OUT/demo" docs/results-ablations-candidate-rows.md --seeds 1 --models "$CANDIDATE"
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings normal --seeds 1 \
  --models mp4sr,pretrain-3,ids-untied-pretrain-3 --report docs/results-ablations-untied-pretrain.md </dev/null
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings normal --seeds 1 \
  --models mp4sr,width-128 --report docs/results-ablations-width.md </dev/null
for name in text-only small-latent; do
  "$BIN/mp4sr-rt" benchmark --out "$OUT/$name" --quiet --threads 1 --settings normal --seeds 1 \
    --models mp4sr,sasrec,sasrec-features,ids-untied,ids-residual \
    --data "$OUT/data/$name/data" --features "$OUT/data/$name/features.safetensors" \
    --report "docs/results-candidate-rows-$name.md" </dev/null
done
"$BIN/python" benchmarks/oracle.py --runs "$OUT/demo" --models mp4sr,sasrec,sasrec-features,ids-untied,ids-residual \
  >docs/bench/oracle-demo.txt
"$BIN/python" benchmarks/id_diagnostics.py "$OUT/demo" --models mp4sr --seed 0 --neighbours 10,50 \
  | grep cold-start >docs/bench/cold-neighbours.jsonl
"$BIN/python" benchmarks/id_diagnostics.py "$OUT/demo" --models mp4sr,sasrec-features --seed 0 \
  | grep '"normal"' >docs/bench/feature-only.jsonl
# 8. the pre-trained encoders' learning rate in fine-tuning (train.finetune_encoder_lr): 1 seed, both
#    settings, and 3 seeds of the 0.1 x lr variant beside the baselines (normal setting)
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings normal --seeds 1 \
  --models mp4sr,encoder-lr-0.3,encoder-lr-0.1,encoder-lr-0.1-40,text-only \
  --report docs/results-ablations-encoder-lr.md </dev/null
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings cold-start --seeds 1 \
  --models mp4sr,encoder-lr-0.1,encoder-lr-0 --report docs/results-ablations-encoder-lr-cold-start.md </dev/null
"$BIN/python" benchmarks/id_diagnostics.py "$OUT/demo" --models mp4sr,encoder-lr-0.1,encoder-lr-0 --seed 0 \
  --offsets=-0.05,0,0.05,0.1 >docs/bench/encoder-lr-cold.jsonl
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings normal --seeds 3 \
  --models mp4sr,sasrec,sasrec-features,encoder-lr-0.1-40 --report docs/results-finetune-encoder-lr.md </dev/null
# 9. popularity smoothing, MP4SR and both baselines
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings normal --seeds 1 \
  --models mp4sr,sasrec,sasrec-features,pop-smooth-0.1,pop-smooth-0.3,sasrec-pop-smooth-0.3,sasrec-features-pop-smooth-0.3 \
  --report docs/results-ablations-popularity-smoothing.md </dev/null
"$BIN/mp4sr-rt" benchmark --out "$OUT/demo" --quiet --threads 1 --settings normal --seeds 3 \
  --models mp4sr,sasrec,sasrec-features,pop-smooth-0.3,sasrec-pop-smooth-0.3,sasrec-features-pop-smooth-0.3 \
  --report docs/results-popularity-smoothing.md </dev/null

#!/usr/bin/env bash
# Rebuild the demo's reference model and its backfilled GSM8K traces from ../shared/data, on CPU.
#
#   bash bench/make_reference_model.sh     # ~10 min on 2 idle CPU cores (~25 min on busy ones)
#
# The reference model stands in for a frontier model: its teacher-forced token probabilities
# become the confidences (frontier_logprobs) of the demo's GSM8K traces, which have none.
#
# 1. corpus: GSM8K *train* (all 7,473 problems, MIT) rendered as the gsm8k template renders a
#    test item ("Question: <q>\nAnswer:\n<solution without <<calc>> annotations>\nThe answer is
#    N."), plus the US inaugural and State of the Union addresses (public domain) as general
#    English, shuffled together with a fixed seed into one JSONL file. Read from ../shared/data
#    (DATA=... to override). GSM8K *test*, where the demo's traces come from, is never read.
# 2. model: `rbridge train`, preset tiny over the demo proxies' tokenizer (tok512), seed 0,
#    2,048,000 tokens at 1,024 tokens a row, on CPU; OUT/final is copied to
#    rbridge_core/examples/models/reference-gsm8k/ (its SOURCE.txt kept).
# 3. traces: the first 100 items of the shipped gsm8k and gsm8k_gpt4o_mini slices (the demo's
#    limit_per_benchmark), backfilled with that model into
#    rbridge_core/examples/traces/reference-backfill/gsm8k_reference_backfill.parquet
#    (confidence_source in its schema metadata).
#
# Deterministic on one machine and torch build (torch 2.13.0+cpu here; checked by a second run):
# model.safetensors and the traces file come out byte for byte the same, meta.json differs only in
# tokens_per_second and the temporary corpus path. Another CPU or build reproduces the recipe, and
# the loss to rounding.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-$ROOT/../shared/data}
VENV=${VENV:-$ROOT/.venv}
WORK=${WORK:-$(mktemp -d -t rbridge-reference-XXXXXX)}
EXAMPLES=$ROOT/rbridge_core/examples
MODEL_DIR=$EXAMPLES/models/reference-gsm8k
TRACES_DIR=$EXAMPLES/traces/reference-backfill
TOKENIZER=$EXAMPLES/tokenizers/tok512/tok512.model
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK"
echo "working in $WORK"

# --- 1. the training corpus --------------------------------------------------------------------
"$VENV/bin/python" - "$DATA" "$WORK/corpus.jsonl" <<'EOF'
import json, random, re, sys
from pathlib import Path

from rbridge_core.templates import template_for

data, out = Path(sys.argv[1]), Path(sys.argv[2])
context = template_for("gsm8k")
docs = []
with open(data / "benchmarks/gsm8k/train.jsonl", encoding="utf-8") as f:
    for line in f:
        if not line.strip():
            continue
        row = json.loads(line)
        reasoning, final = row["answer"].rsplit("\n#### ", 1)
        solution = re.sub(r"<<[^<>]*>>", "", reasoning).strip()
        answer = final.strip().replace(",", "")
        docs.append(context.render(row["question"].strip()) + f"{solution}\nThe answer is {answer}.")
n_gsm8k = len(docs)
speeches = data / "corpora/speeches_public_domain"
for path in sorted([*speeches.glob("inaugural/*.txt"), *speeches.glob("state_union/*.txt")]):
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # some State of the Union files are ISO-8859-1
        text = raw.decode("latin-1")
    text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n")).strip()
    if text:
        docs.append(text)
random.Random(0).shuffle(docs)
with open(out, "w", encoding="utf-8") as f:
    for doc in docs:
        f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
chars = sum(map(len, docs))
print(f"corpus: {n_gsm8k} GSM8K train solutions + {len(docs) - n_gsm8k} speeches, {chars:,} chars")
EOF

# --- 2. the reference model ---------------------------------------------------------------------
cat >"$WORK/training.yaml" <<'EOF'
train_tokens: 2048000
seq_len_tokens: 1024
batch_size: 2
lr: 0.005
warmup_steps: 30
min_lr_ratio: 0.1
weight_decay: 0.1
seed: 0
checkpoint_every_steps: 100
keep_last_checkpoints: 10
log_every_steps: 10
EOF
rm -rf "$WORK/run"
"$VENV/bin/rbridge" train --corpus "$WORK/corpus.jsonl" --tokenizer "$TOKENIZER" --preset tiny \
    --config "$WORK/training.yaml" --name reference-gsm8k --repeat --device cpu --out "$WORK/run"
rm -rf "$MODEL_DIR.new"
mkdir -p "$MODEL_DIR.new"
cp "$WORK/run/final/"* "$MODEL_DIR.new/" && chmod 644 "$MODEL_DIR.new/"*
[ -f "$MODEL_DIR/SOURCE.txt" ] && cp "$MODEL_DIR/SOURCE.txt" "$MODEL_DIR.new/"
rm -rf "$MODEL_DIR" && mv "$MODEL_DIR.new" "$MODEL_DIR"

# --- 3. backfilled GSM8K traces -----------------------------------------------------------------
# From the repository root with relative paths: the metadata records the model as given here.
cd "$ROOT"
mkdir -p "$TRACES_DIR"
"$VENV/bin/rbridge" traces build --benchmark gsm8k --benchmark gsm8k_gpt4o_mini --limit 100 \
    --out "$WORK/gsm8k_plain.jsonl"
"$VENV/bin/rbridge" traces backfill --model rbridge_core/examples/models/reference-gsm8k \
    --traces "$WORK/gsm8k_plain.jsonl" --device cpu \
    --out rbridge_core/examples/traces/reference-backfill/gsm8k_reference_backfill.parquet
echo "done: $MODEL_DIR, $TRACES_DIR/gsm8k_reference_backfill.parquet"

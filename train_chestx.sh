#!/usr/bin/env bash
# The paper's experiments on ChestX in one command: the 16 training runs of section 4, then eval.py.
#
#   bash train_chestx.sh                                              # the paper: 256 px, 200 rounds (a GPU)
#   QUICK=1 DATA_ROOT=../shared/data/pneumoniamnist.npz bash train_chestx.sh   # CPU-sized, under an hour
#
# Runs: vanilla FedGAN; the attack with 16, 32 and 64 px triggers (at 256 px; scaled to IMG); and for
# each trigger FedDetect, model reconstruction, random flip and random rotation (1 + 3 + 12 = 16).
# Then eval.py: fidelity of all 16 (LPIPS per class where its weights are at hand, and a domain FID)
# and the utility study of Figure 7 for vanilla, attack32 and feddetect32. Finished runs are skipped,
# a stopped run resumes from its checkpoint, and the first failing run stops the script.
# train_isic.sh runs this same grid with DATASET=isic.
#
# Settings (environment; defaults are the paper's, QUICK=1 swaps in the CPU-sized ones):
#   DATASET    chestx | isic (what train_isic.sh sets)      DATA_ROOT  data folder or .npz (fedgan's default)
#   IMG        resolution (256; quick 32)                   ROUNDS     global rounds (200; quick 20)
#   CLIENTS    clients (4)                                   SEEDS      utility-study seeds (5; quick 3)
#   SEED       training seed (0)                             DEVICE     auto | cpu | cuda
#   OUT        output folder (runs/paper_DATASET; quick runs/quick_DATASET)
#   METRICS    fidelity metrics (lpips,fid; quick fid)       LPIPS_DIR  folder with the LPIPS weights (offline)
#   PYTHON     interpreter (python)
set -euo pipefail
cd "$(dirname "$0")"

DATASET=${DATASET:-chestx}
QUICK=${QUICK:-0}
CLIENTS=${CLIENTS:-4}
SEED=${SEED:-0}
DEVICE=${DEVICE:-auto}
PYTHON=${PYTHON:-python}
LPIPS_DIR=${LPIPS_DIR:-}
if [ "$QUICK" = 1 ]; then
    # 32 px, 20 rounds of 10 local steps, a narrow model, a short reconstruction and a small classifier
    IMG=${IMG:-32}; ROUNDS=${ROUNDS:-20}; SEEDS=${SEEDS:-3}; OUT=${OUT:-runs/quick_$DATASET}
    METRICS=${METRICS:-$([ -n "$LPIPS_DIR" ] && echo lpips,fid || echo fid)}
    MODEL=(--arch small --width 16 --local-steps 10 --warmup 5 --reconstruct-epochs 5 --reconstruct-per-class 200)
    STUDY=(--classifier small --epochs 10 --n-real "5,20,100" --n-synth 500 --fid-epochs 5 --pairs 200)
else
    IMG=${IMG:-256}; ROUNDS=${ROUNDS:-200}; SEEDS=${SEEDS:-5}; OUT=${OUT:-runs/paper_$DATASET}
    METRICS=${METRICS:-lpips,fid}
    MODEL=(--arch paper)
    STUDY=()
fi
DATA=(--dataset "$DATASET")
if [ -n "${DATA_ROOT:-}" ]; then
    DATA+=(--data-root "$DATA_ROOT")
elif [ "$QUICK" = 1 ] && [ "$DATASET" = isic ]; then
    DATA=(--dataset synthetic --channels 3 --decay 0.9)  # the embedded lesion-like RGB set, ISIC's decay
fi
if [ -n "$LPIPS_DIR" ]; then
    STUDY+=(--weights-dir "$LPIPS_DIR")
fi
COMMON=("${DATA[@]}" --img-size "$IMG" --rounds "$ROUNDS" --clients "$CLIENTS" --seed "$SEED"
        --device "$DEVICE" "${MODEL[@]}")

# The grid: a name and the flags that make it (trigger sizes are the paper's, scaled to IMG)
NAMES=(vanilla)
FLAGS=("")
for p in 16 32 64; do
    px=$(( p * IMG / 256 ))
    if [ "$px" -lt 1 ]; then px=1; fi
    NAMES+=("attack$p"); FLAGS+=("--poison $px")
    for defense in feddetect reconstruct flip rotate; do
        NAMES+=("$defense$p"); FLAGS+=("--poison $px --defense $defense")
    done
done

mmss() { printf '%d:%02d' $(( $1 / 60 )) $(( $1 % 60 )); }

mkdir -p "$OUT"
exec 9> "$OUT/.lock"  # two scripts on one folder would train the same run twice
if ! flock -n 9; then
    echo "another train script is running on $OUT; wait for it or choose another OUT" >&2
    exit 1
fi
echo "grid: ${#NAMES[@]} runs of $DATASET at ${IMG} px, $ROUNDS rounds, $CLIENTS clients -> $OUT (quick=$QUICK)"
t_start=$SECONDS
ran=0
for k in "${!NAMES[@]}"; do
    name=${NAMES[$k]}
    dir=$OUT/$name
    log=$OUT/$name.log
    tag="[run $((k + 1))/${#NAMES[@]}] $name"
    if [ -f "$dir/summary.json" ]; then
        echo "$tag: finished earlier, skipped"
        continue
    fi
    t_run=$SECONDS
    if [ -f "$dir/checkpoint.pt" ]; then
        echo "$tag: resuming from its checkpoint (log $log)"
        cmd=("$PYTHON" fedgan.py --resume "$dir")
    else
        echo "$tag: training (log $log)"
        rm -rf "$dir"  # a run stopped before its first checkpoint starts over
        # shellcheck disable=SC2206  # FLAGS entries are flag lists, split on purpose
        cmd=("$PYTHON" fedgan.py "${COMMON[@]}" ${FLAGS[$k]} --out "$dir")
    fi
    if ! "${cmd[@]}" >> "$log" 2>&1; then
        echo "$tag FAILED; see $log:" >&2
        tail -n 5 "$log" >&2
        exit 1
    fi
    ran=$((ran + 1))
    elapsed=$((SECONDS - t_start))
    left=$(( elapsed * (${#NAMES[@]} - k - 1) / ran ))
    grep -E "^(detector|backdoor)" "$log" | tail -n 2 | sed 's/^/    /' || true
    echo "$tag: done in $(mmss $((SECONDS - t_run))); elapsed $(mmss "$elapsed"), about $(mmss "$left") of training left"
done

# eval: fidelity of every run; utility of vanilla, the 32 px attack and FedDetect against it
RUNS=()
for name in "${NAMES[@]}"; do RUNS+=("$OUT/$name"); done
echo "[eval] fidelity ($METRICS) of ${#RUNS[@]} runs -> $OUT/eval_fidelity (log $OUT/eval_fidelity.log)"
"$PYTHON" eval.py "${RUNS[@]}" --metrics "$METRICS" --seed "$SEED" --device "$DEVICE" "${STUDY[@]}" \
    --out "$OUT/eval_fidelity" > "$OUT/eval_fidelity.log" 2>&1 || { tail -n 5 "$OUT/eval_fidelity.log" >&2; exit 1; }
echo "[eval] utility study ($SEEDS seeds) -> $OUT/eval_utility (log $OUT/eval_utility.log)"
"$PYTHON" eval.py "$OUT/vanilla" "$OUT/attack32" "$OUT/feddetect32" --metrics utility --seeds "$SEEDS" \
    --seed "$SEED" --device "$DEVICE" "${STUDY[@]}" \
    --out "$OUT/eval_utility" > "$OUT/eval_utility.log" 2>&1 || { tail -n 5 "$OUT/eval_utility.log" >&2; exit 1; }

{
    echo "# $DATASET grid ($([ "$QUICK" = 1 ] && echo "QUICK mode, CPU-sized" || echo "paper settings"))"
    echo
    echo "${#NAMES[@]} runs at ${IMG} px, $ROUNDS rounds, $CLIENTS clients, seed $SEED; data: ${DATA[*]}."
    echo "Training and eval took $(mmss $((SECONDS - t_start))) (min:s) in this invocation (finished runs skipped)."
    echo
    echo "## Detection (from each run's summary.json)"
    echo
    "$PYTHON" - "$OUT" "${NAMES[@]}" <<'EOF'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
print("| run | final weights | attacker's final weight | detector TPR | detector FPR | trigger in samples |")
print("|---|---|---|---|---|---|")
for n in names:
    s = json.load(open(f"{out}/{n}/summary.json"))
    c = json.load(open(f"{out}/{n}/config.json"))
    detects = c.get("detector", "paper" if c["defense"] == "feddetect" else "none") != "none"
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    mal = fmt(s["malicious_final_weight"]) if s["malicious"] else "-"
    rates = [fmt(s.get(k)) if detects else "-" for k in ("tpr_after_warmup", "fpr_after_warmup")]
    print(f"| {n} | {' '.join(f'{w:.3f}' for w in s['final_weights'])} | {mal} | {' | '.join(rates)} | "
          f"{fmt(s.get('trigger_rate'))} |")
# the control: how often the vanilla generator shows each trigger by chance
import fedgan
cfg = fedgan.finalize(fedgan.config_from_json(json.load(open(f"{out}/vanilla/config.json")), "config.json"))
g = fedgan.load_generator(f"{out}/vanilla/generator.pt")
real = fedgan.data_of(cfg).test[0]
chance = []
for n in names:
    c = json.load(open(f"{out}/{n}/config.json"))
    if n.startswith("attack"):
        trig = fedgan.make_trigger(c["poison"], cfg.channels, cfg.trigger, seed=cfg.seed)
        rate = fedgan.backdoor_figures(g, trig, fedgan.trigger_margin(cfg.img_size), real, cfg.seed + 12345)
        chance.append(f"{c['poison']} px: {rate['trigger_rate']:.3f}")
print(f"\nTrigger in samples: the fraction of 512 generated images that show the trigger. The vanilla generator "
      f"shows each trigger by chance in: {', '.join(chance)}.")
EOF
    echo
    sed '1d' "$OUT/eval_fidelity/results.md"
    echo
    sed '1d' "$OUT/eval_utility/results.md"
} > "$OUT/results.md"
echo "done in $(mmss $((SECONDS - t_start))): $OUT/results.md"

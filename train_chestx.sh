#!/usr/bin/env bash
# The paper's experiments on ChestX in one command: a grid of training runs over seeds, then eval.py.
#
#   bash train_chestx.sh                                              # the paper: 256 px, 200 rounds (a GPU)
#   QUICK=1 JOBS=2 DATA_ROOT=../shared/data/pneumoniamnist.npz bash train_chestx.sh   # CPU-sized, hours
#   DRY=1 QUICK=1 DATA_ROOT=../shared/data/pneumoniamnist.npz bash train_chestx.sh    # list its runs, train nothing
#   GRID=study QUICK=1 JOBS=2 SHADOW=1 DATA_ROOT=../shared/data/pneumoniamnist.npz bash train_chestx.sh
#
# Grids (GRID):
#   paper  section 4's 16 runs: vanilla FedGAN; the attack with 16, 32 and 64 px triggers (at 256 px,
#          scaled to IMG); for each trigger FedDetect, model reconstruction, random flip, random rotation;
#          plus, at the 64 px trigger, the probe detector (probe64) and multi-Krum (multikrum64).
#          Vanilla and the 64 px arms get SEEDS seeds, the 16 and 32 px arms SEEDS_SMALL.
#   study  one trigger (TRIGGER px at 256 px; 64 = 8 px at 32 px) against every kind of defense: vanilla,
#          attack, feddetect (paper rule), calibrated, multikrum, rotate, reconstruct, watch (the probe
#          detector); and central, the centralized reference
#          (one party on all the training data for as many image-steps: what federation costs).
# Recipe: QUICK=1 trains with fedgan.py's working recipe (--recipe fedgan: Adam 2e-3, betas 0/0.99, D on one
# joint batch of real and fake images), since the paper's trains saturated blobs at the CPU scale
# (docs/results.md, section 3); the paper-sized grid keeps the paper's recipe (RECIPE=paper), untested there.
# Every run of the grid is trained once per training seed (SEEDS of them, from SEED on), into
# OUT/<name>_s<seed>. With SHORT > 0 each run is first trained SHORT rounds, that generator is kept as
# OUT/<name>_r<SHORT>_s<seed>, and the run is then extended to ROUNDS (bitwise the same as a straight
# run), so short and long training are compared on the same seeds. Then eval.py groups the folders into
# arms (runs that differ only by seed) and reports every figure as a mean with a 95% interval over seeds,
# and each arm's paired difference from vanilla and from the attack. Finished runs are skipped, a stopped
# run resumes from its checkpoint, and the first failing run stops the script.
# train_isic.sh runs the same grids with DATASET=isic.
#
# Settings (environment; defaults are the paper's, QUICK=1 swaps in the CPU-sized ones):
#   DATASET    chestx | isic (what train_isic.sh sets)      DATA_ROOT  data folder or .npz (fedgan's default)
#   GRID       paper | study                                TRIGGER    study grid's trigger at 256 px (64)
#   IMG        resolution (256; quick 32)                   ROUNDS     global rounds (200; quick 100)
#   SEEDS      training seeds (1; quick: paper grid 5, study 3)  SEED  first training seed (0)
#   SEEDS_SMALL  paper grid: seeds of the 16 and 32 px arms (SEEDS; quick 3)
#   SHORT      also keep the generator after SHORT rounds (0 = no; quick 20)
#   CLIENTS    clients (4)                                   DEVICE     auto | cpu | cuda
#   JOBS       runs trained at once (1); with JOBS > 1 each gets OMP_NUM_THREADS=1 unless it is set
#   SHADOW     1: every run logs what all four detectors would flag (fedgan.py --shadow)
#   RECIPE     fedgan.py --recipe: paper (the paper's optimizer and discriminator batches) | fedgan (quick's default)
#   DRY        1: print the fedgan.py and eval.py commands the grid would run, and run nothing
#   OUT        output folder (runs/paper_DATASET; quick runs/quick_DATASET; study: ..._study)
#   METRICS    fidelity metrics (lpips,fid,kid,pr,trigger; quick without lpips unless LPIPS_DIR is set)
#   LPIPS_DIR  folder with the LPIPS weights (offline)      PYTHON     interpreter (the first of python, python3
#                                                                      that imports torch)
#   EVAL_FLAGS more eval.py flags, after the preset ones (they win), e.g. "--n-synth 100 --seeds 1"
#   ARMS       only these runs of the grid (all)             UTILITY    arms of the utility study
#              (paper: the 64 px arms and vanilla; study: every arm, at ROUNDS)
# Relative DATA_ROOT, OUT and LPIPS_DIR are taken from where you stand. A run folder counts as finished only
# if its config.json is the run the grid asks for; one trained with other settings stops the script.
set -euo pipefail
for v in DATA_ROOT OUT LPIPS_DIR; do  # the script works from its own folder: make the user's paths absolute
    if [ -n "${!v:-}" ] && [[ "${!v}" != /* ]]; then printf -v "$v" '%s' "$PWD/${!v}"; fi
done
cd "$(dirname "$0")"
if [ -z "${PYTHON:-}" ]; then
    for p in python python3; do
        if command -v "$p" > /dev/null && "$p" -c "import torch, torchvision, numpy, PIL" 2> /dev/null; then
            PYTHON=$p; break
        fi
    done
    if [ -z "${PYTHON:-}" ]; then
        echo "no python here imports torch, torchvision, numpy and pillow; install them (README's first line)" \
             "or set PYTHON=/path/to/python" >&2
        exit 2
    fi
fi

DATASET=${DATASET:-chestx}
GRID=${GRID:-paper}
SUFFIX=$([ "$GRID" = study ] && echo _study || true)
QUICK=${QUICK:-0}
TRIGGER=${TRIGGER:-64}
CLIENTS=${CLIENTS:-4}
SEED=${SEED:-0}
DEVICE=${DEVICE:-auto}
LPIPS_DIR=${LPIPS_DIR:-}
JOBS=${JOBS:-1}
SHADOW=${SHADOW:-0}
DRY=${DRY:-0}
case "$GRID" in paper|study) ;; *) echo "GRID=$GRID: choose paper or study" >&2; exit 2 ;; esac
if [ "$QUICK" = 1 ]; then
    # 32 px, 100 rounds of 5 local steps with a width-8 model: 5-6 minutes a run on one CPU core
    IMG=${IMG:-32}; ROUNDS=${ROUNDS:-100}; SHORT=${SHORT:-20}; RECIPE=${RECIPE:-fedgan}
    SEEDS=${SEEDS:-$([ "$GRID" = paper ] && echo 5 || echo 3)}; SEEDS_SMALL=${SEEDS_SMALL:-3}
    OUT=${OUT:-runs/quick_$DATASET$SUFFIX}
    METRICS=${METRICS:-${LPIPS_DIR:+lpips,}fid,kid,pr,trigger}
    MODEL=(--arch small --width 8 --local-steps 5)
    WARM=" --warmup 5"  # every detector's warm-up m at 100 rounds (the paper's 10 at 200)
    CENTRAL="--clients 1 --local-steps $((5 * ${CLIENTS:-4}))"  # one party, all the data, as many image-steps
    RECON="--reconstruct-epochs 5 --reconstruct-per-class 200"  # only where --posthoc reconstruct uses them
    STUDY=(--classifier small --epochs 10 --n-real "5,50" --n-synth 500 --fid-epochs 5 --pairs 200 --seeds 2)
else
    IMG=${IMG:-256}; ROUNDS=${ROUNDS:-200}; SEEDS=${SEEDS:-1}; SHORT=${SHORT:-0}; RECIPE=${RECIPE:-paper}
    SEEDS_SMALL=${SEEDS_SMALL:-$SEEDS}
    OUT=${OUT:-runs/paper_$DATASET$SUFFIX}
    METRICS=${METRICS:-lpips,fid,kid,pr,trigger}
    MODEL=(--arch paper)
    WARM=""
    RECON=""
    CENTRAL="--clients 1"  # one local epoch over all the data: as many image-steps as N clients' epochs
    STUDY=()
fi
for v in SEEDS SEEDS_SMALL JOBS ROUNDS SHORT; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]] || { [ "$v" != SHORT ] && [ "${!v}" -lt 1 ]; }; then
        echo "$v=${!v}: must be a positive whole number" >&2; exit 2
    fi
done
if [ "$SHORT" -ge "$ROUNDS" ]; then SHORT=0; fi
if [ "$JOBS" -gt 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
DATA=(--dataset "$DATASET")
if [ -n "${DATA_ROOT:-}" ]; then
    DATA+=(--data-root "$DATA_ROOT")
elif [ "$QUICK" = 1 ] && [ "$DATASET" = isic ]; then
    DATA=(--dataset synthetic --channels 3 --no-tanh)  # the lesion-like RGB set, as isic: linear G, and decay 0.9
    DECAY=" --decay 0.9"                                # for the detectors
fi
if [ -n "$LPIPS_DIR" ]; then
    STUDY+=(--weights-dir "$LPIPS_DIR")
fi
# shellcheck disable=SC2206  # a flag list, split on purpose
STUDY+=(${EVAL_FLAGS:-})
COMMON=("${DATA[@]}" --img-size "$IMG" --clients "$CLIENTS" --device "$DEVICE" --recipe "$RECIPE" "${MODEL[@]}")
# shellcheck disable=SC2206  # WARM is a flag list, split on purpose
if [ "$SHADOW" = 1 ]; then COMMON+=(--shadow $WARM); fi
DET="$WARM${DECAY:-}"  # what every arm with a detector adds

px_of() { local px=$(( $1 * IMG / 256 )); echo $(( px < 1 ? 1 : px )); }
# The grid: a name, the flags that make it and its number of training seeds
NAMES=(vanilla)
FLAGS=("")
NSEEDS=("$SEEDS")
if [ "$GRID" = paper ]; then
    for p in 16 32 64; do
        n=$([ "$p" = 64 ] && echo "$SEEDS" || echo "$SEEDS_SMALL")
        NAMES+=("attack$p"); FLAGS+=("--poison $(px_of $p)"); NSEEDS+=("$n")
        for defense in feddetect reconstruct flip rotate; do
            extra=""
            if [ "$defense" = reconstruct ]; then extra=" $RECON"; fi
            if [ "$defense" = feddetect ]; then extra="$DET"; fi
            NAMES+=("$defense$p"); FLAGS+=("--poison $(px_of $p) --defense $defense$extra"); NSEEDS+=("$n")
        done
    done
    a="--poison $(px_of 64)"
    NAMES+=(probe64 multikrum64); FLAGS+=("$a --detector probe$DET" "$a --aggregator multi-krum")
    NSEEDS+=("$SEEDS" "$SEEDS")
    UTILITY=${UTILITY:-vanilla attack64 feddetect64 reconstruct64 flip64 rotate64 probe64 multikrum64}
    BASELINES=vanilla,attack64
else
    p=$TRIGGER; a="--poison $(px_of $p)"
    NAMES+=("attack$p" "feddetect$p" "calibrated$p" "multikrum$p" "rotate$p" "reconstruct$p" "watch$p" "central")
    FLAGS+=("$a" "$a --defense feddetect$DET" "$a --detector calibrated$DET" "$a --aggregator multi-krum"
            "$a --augment rotate" "$a --posthoc reconstruct $RECON" "$a --detector probe$DET" "$CENTRAL")
    BASELINES=vanilla,attack$p
    for _ in "${NAMES[@]:1}"; do NSEEDS+=("$SEEDS"); done
fi
if [ -n "${ARMS:-}" ]; then  # only these runs of the grid, e.g. ARMS="vanilla attack64 calibrated64"
    KEEP_N=() KEEP_F=() KEEP_S=()
    for arm in $ARMS; do
        found=0
        for k in "${!NAMES[@]}"; do
            if [ "${NAMES[$k]}" = "$arm" ]; then
                KEEP_N+=("$arm"); KEEP_F+=("${FLAGS[$k]}"); KEEP_S+=("${NSEEDS[$k]}"); found=1
            fi
        done
        if [ "$found" = 0 ]; then echo "ARMS: $arm is not in the $GRID grid (${NAMES[*]})" >&2; exit 2; fi
    done
    NAMES=("${KEEP_N[@]}") FLAGS=("${KEEP_F[@]}") NSEEDS=("${KEEP_S[@]}")
fi
if [ "$GRID" = study ]; then UTILITY=${UTILITY:-${NAMES[*]}}; fi
in_grid() { local a; for a in "${NAMES[@]}"; do if [ "$a" = "$1" ]; then return 0; fi; done; return 1; }
KEEP=()  # checked now, not after hours of training: eval compares with the baselines the grid trains
for b in ${BASELINES//,/ }; do if in_grid "$b"; then KEEP+=("$b"); else echo "note: baseline $b is not among ARMS"; fi; done
BASE=()
if [ "${#KEEP[@]}" -gt 0 ]; then BASE=(--baseline "$(IFS=,; echo "${KEEP[*]}")"); fi
KEEP=()
for u in $UTILITY; do
    if in_grid "$u"; then KEEP+=("$u")
    elif [ -z "${ARMS:-}" ]; then echo "UTILITY: $u is not in the $GRID grid (${NAMES[*]})" >&2; exit 2
    else echo "note: utility arm $u is not among ARMS, left out"; fi
done
UTILITY="${KEEP[*]}"

mmss() { printf '%d:%02d' $(( $1 / 60 )) $(( $1 % 60 )); }
rounds_in() { "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["rounds"])' "$1"; }
rounds_of() { rounds_in "$1/config.json"; }  # what the run is set to reach
# a run is finished at R rounds when its summary says so (an extension keeps the shorter run's summary until it ends)
finished() { [ -f "$1/summary.json" ] && [ "$(rounds_in "$1/summary.json")" = "$2" ]; }
same_run() {  # DIR FLAG...: is DIR, if it exists, the run these flags start (--rounds aside)?
    [ -f "$1/config.json" ] || return 0
    "$PYTHON" - "$@" <<'PY'
import json, sys, fedgan
folder, flags = sys.argv[1], sys.argv[2:]
want = fedgan.parse_args(flags + ["--out", folder])
have = fedgan.config_from_json(json.load(open(folder + "/config.json")), folder)
diff = [k for k in vars(want) if k not in fedgan.RESUMABLE | {"out"} and getattr(want, k) != getattr(have, k)]
if diff:
    sys.exit(f"{folder} holds a run with other settings ("
             + ", ".join(f"{k} {getattr(have, k)!r}, the grid asks {getattr(want, k)!r}" for k in diff)
             + "); move it away or choose another OUT")
PY
}

train_to() {  # DIR LOG ROUNDS FLAG...: start, resume or extend the run in DIR to ROUNDS rounds
    local dir=$1 log=$2 rounds=$3
    shift 3
    if [ -f "$dir/checkpoint.pt" ]; then
        "$PYTHON" fedgan.py --resume "$dir" --rounds "$rounds" >> "$log" 2>&1
    else
        rm -rf "$dir"  # a run stopped before its first checkpoint starts over
        "$PYTHON" fedgan.py "${COMMON[@]}" "$@" --rounds "$rounds" --out "$dir" >> "$log" 2>&1
    fi
}

run_one() {  # K SEED: run K of the grid with this training seed (and its SHORT-round copy)
    local name=${NAMES[$1]} seed=$2 t_run=$SECONDS
    local dir=$OUT/${name}_s$seed log=$OUT/${name}_s$seed.log snap=$OUT/${name}_r${SHORT}_s$seed
    local tag="[${name}_s$seed]"
    # shellcheck disable=SC2206  # FLAGS entries are flag lists, split on purpose
    local flags=(${FLAGS[$1]} --seed "$seed")
    same_run "$dir" "${COMMON[@]}" "${flags[@]}" && same_run "$snap" "${COMMON[@]}" "${flags[@]}" || return 1
    if finished "$dir" "$ROUNDS"; then echo "$tag finished earlier, skipped"; return 0; fi
    echo "$tag training (log $log)"
    if [ "$SHORT" -gt 0 ] && ! finished "$snap" "$SHORT"; then
        if [ -f "$dir/config.json" ] && [ "$(rounds_of "$dir")" -gt "$SHORT" ]; then
            echo "$tag: already past $SHORT rounds, so its ${SHORT}-round copy cannot be made; going on" >&2
        else
            train_to "$dir" "$log" "$SHORT" "${flags[@]}" || { echo "$tag FAILED; see $log" >&2; return 1; }
            rm -rf "$snap" "$snap.part" && cp -r "$dir" "$snap.part" && mv "$snap.part" "$snap"
        fi
    fi
    train_to "$dir" "$log" "$ROUNDS" "${flags[@]}" || { echo "$tag FAILED; see $log:" >&2; tail -n 5 "$log" >&2; return 1; }
    grep -E "^(detector|backdoor)" "$log" | tail -n 2 | sed "s/^/    $tag /" || true
    echo "$tag done in $(mmss $((SECONDS - t_run)))"
}

seeds_of() {  # K: the training seeds of run K of the grid
    seq "$SEED" $((SEED + NSEEDS[$1] - 1))
}
ORDER=()  # "K SEED" pairs: the arms with the most seeds first (seed by seed), so a stopped grid has whole columns
for tier in $(printf '%s\n' "${NSEEDS[@]}" | sort -rnu); do
    for seed in $(seq "$SEED" $((SEED + tier - 1))); do
        for k in "${!NAMES[@]}"; do
            if [ "${NSEEDS[$k]}" = "$tier" ]; then ORDER+=("$k $seed"); fi
        done
    done
done

if [ "$DRY" = 1 ]; then  # the commands, in the order they would run; nothing is trained or written
    echo "# grid $GRID: ${#ORDER[@]} runs of $DATASET at ${IMG} px, $ROUNDS rounds$([ "$SHORT" -gt 0 ] &&
          echo ", each kept at $SHORT rounds as NAME_r${SHORT}_sSEED"), $JOBS at once -> $OUT"
    for pair in "${ORDER[@]}"; do
        read -r k seed <<< "$pair"
        dir=$OUT/${NAMES[$k]}_s$seed
        first=$([ "$SHORT" -gt 0 ] && echo "$SHORT" || echo "$ROUNDS")
        # shellcheck disable=SC2086  # FLAGS entries are flag lists, split on purpose
        echo "$PYTHON fedgan.py ${COMMON[*]} ${FLAGS[$k]} --seed $seed --rounds $first --out $dir" | tr -s ' '
        if [ "$SHORT" -gt 0 ]; then echo "$PYTHON fedgan.py --resume $dir --rounds $ROUNDS"; fi
    done
    echo "# then: eval.py on every run (fidelity, trigger, detection) and on $UTILITY (utility) -> $OUT/results.md"
    exit 0
fi

mkdir -p "$OUT"
exec 9> "$OUT/.lock"  # two scripts on one folder would train the same run twice
if ! flock -n 9; then
    echo "another train script is running on $OUT; wait for it or choose another OUT" >&2
    exit 1
fi
echo "grid $GRID: ${#ORDER[@]} runs ($(IFS=/; echo "${NSEEDS[*]}" | tr '/' '\n' | sort -u | paste -sd/) seeds an arm)" \
     "of $DATASET at ${IMG} px, $ROUNDS rounds $([ "$SHORT" -gt 0 ] && echo "(kept at $SHORT too)"), $CLIENTS clients," \
     "$JOBS at once -> $OUT (quick=$QUICK)"
t_start=$SECONDS
failed=0
for pair in "${ORDER[@]}"; do
    read -r k seed <<< "$pair"
    if [ "$JOBS" = 1 ]; then
        run_one "$k" "$seed" || exit 1
        continue
    fi
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || failed=1; done
    if [ "$failed" = 1 ]; then break; fi
    run_one "$k" "$seed" &
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
if [ "$failed" = 1 ]; then exit 1; fi
echo "training took $(mmss $((SECONDS - t_start))) (min:s) in this invocation (finished runs skipped)"

# eval: fidelity and detection of every run (arms = runs that differ only by seed); utility of UTILITY
t_eval=$SECONDS
RUNS=()
SUFFIXES=("")
if [ "$SHORT" -gt 0 ]; then SUFFIXES+=("_r$SHORT"); fi
for suffix in "${SUFFIXES[@]}"; do
    for k in "${!NAMES[@]}"; do
        for seed in $(seeds_of "$k"); do RUNS+=("$OUT/${NAMES[$k]}${suffix}_s$seed"); done
    done
done
U_RUNS=()
for name in $UTILITY; do
    for k in "${!NAMES[@]}"; do
        if [ "${NAMES[$k]}" = "$name" ]; then
            for seed in $(seeds_of "$k"); do U_RUNS+=("$OUT/${name}_s$seed"); done
        fi
    done
done
echo "[eval] fidelity ($METRICS) and detection of ${#RUNS[@]} runs -> $OUT/eval_fidelity (log $OUT/eval_fidelity.log)"
"$PYTHON" eval.py "${RUNS[@]}" --metrics "$METRICS" "${BASE[@]}" --seed "$SEED" --device "$DEVICE" \
    "${STUDY[@]}" --out "$OUT/eval_fidelity" --force > "$OUT/eval_fidelity.log" 2>&1 \
    || { tail -n 5 "$OUT/eval_fidelity.log" >&2; exit 1; }
if [ "${#U_RUNS[@]}" -gt 0 ]; then
    echo "[eval] utility study of $UTILITY -> $OUT/eval_utility (log $OUT/eval_utility.log)"
    "$PYTHON" eval.py "${U_RUNS[@]}" --metrics utility --match-steps "${BASE[@]}" --seed "$SEED" \
        --device "$DEVICE" "${STUDY[@]}" --out "$OUT/eval_utility" --force > "$OUT/eval_utility.log" 2>&1 \
        || { tail -n 5 "$OUT/eval_utility.log" >&2; exit 1; }
fi
{
    echo "# $DATASET, grid $GRID ($([ "$QUICK" = 1 ] && echo "QUICK mode, CPU-sized" || echo "paper settings"))"
    echo
    echo "${#NAMES[@]} runs x up to $SEEDS training seeds (from $SEED) at ${IMG} px, $ROUNDS rounds$([ "$SHORT" -gt 0 ] &&
         echo " (and the same runs after $SHORT rounds)"), $CLIENTS clients; data: ${DATA[*]}; model: ${MODEL[*]}."
    echo "This invocation took $(mmss $((SECONDS - t_start))) (min:s), eval $(mmss $((SECONDS - t_eval))) of it" \
         "(finished runs skipped)."
    echo
    sed '1d' "$OUT/eval_fidelity/results.md"
    if [ "${#U_RUNS[@]}" -gt 0 ]; then echo; sed '1d' "$OUT/eval_utility/results.md"; fi
} > "$OUT/results.md"
echo "done in $(mmss $((SECONDS - t_start))): $OUT/results.md"

# Device side, after `source benchmarks/device/unpack_full.sh` (or its SmolLM2 half): the
# paper-exact AWQ search and the fast variants (W3 unless BITS) over AWQ search seeds,
# searched and evaluated on the GPU (rows say so). One AWQ search's perplexity moves by a
# few percent with the tokens it samples (quality.md), so issue #2's fast-vs-exact bar is
# judged on means over seeds, all measured on one machine.
#
#   bash benchmarks/device/awq_seeds.sh start MODEL   # detached runs, one per method set
#       (env: SETS="awq-exact awq,awq-gram" method sets, SEEDS=0,1,2, BITS=3; e.g. BITS=4,
#        where awq and awq-gram are one search: SETS="awq-exact awq,awq-ls4" there;
#        WAYS=2 splits each set's seeds over 2 processes)
#   bash benchmarks/device/awq_seeds.sh wait SECONDS  # until all end or SECONDS pass;
#                                                     # merged rows -> $OUT/quality_gpu.json
#
# The runs share the GPU, so their search times say little; the perplexities are what count.
# Measured on an H100 with 6 such processes at once (W4, both models): one paper-exact search
# takes 60-80 s (SmolLM2) or about 60 s (Gemma), a fast one 5-15 s, and each row's evaluation
# 10-40 s more; the model parts arrive in 6 calls (pack_full.sh), about 2 min in all.
# Here, merge $OUT/quality_gpu.json into benchmarks/results/quality_gpu.json (quality.save
# re-renders its .md, whose checks compare only rows of that file).
set -u
dir=/tmp/seeds
mkdir -p "$dir"
case "${1:-}" in
start)
    model=$2
    # convert once, then share
    python3 -c "from edgequant.zoo import load; load('$model')" || exit 1
    IFS=, read -ra seeds <<<"${SEEDS:-0,1,2}"
    ways=${WAYS:-1}
    [[ $ways =~ ^[1-9][0-9]*$ ]] || { echo "WAYS must be a whole number >= 1" >&2; exit 2; }
    for methods in ${SETS:-fp,rtn,awq-exact awq,awq-gram}; do
        for ((w = 0; w < ways; w++)); do  # seeds w, w + WAYS, ... in one process
            part=$(for ((i = w; i < ${#seeds[@]}; i += ways)); do echo "${seeds[i]}"; done)
            part=$(paste -sd, <<<"$part")
            m=$methods  # fp has no seed: the first process alone evaluates it
            ((w == 0)) || m=$(tr , '\n' <<<"$methods" | grep -vx fp | paste -sd,)
            [ -n "$part" ] && [ -n "$m" ] || continue
            tag="$model-w${BITS:-3}-${m//,/_}-s${part//,/_}"
            OMP_NUM_THREADS=3 setsid nohup python3 benchmarks/quality.py --device cuda \
                --models "$model" --bits "${BITS:-3}" --methods "$m" --seeds "$part" \
                --out "$dir/$tag.json" >"$dir/$tag.log" 2>&1 </dev/null &
            echo $! >>"$dir/pids"
        done
    done
    ;;
wait)
    end=$((SECONDS + $2))
    running() { for p in $(cat "$dir/pids"); do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
    while running && [ $SECONDS -lt $end ]; do sleep 5; done
    running && echo "WARNING: runs still going after $2 s; merging the rows done so far"
    tail -n 3 "$dir"/*.log
    python3 - "$dir" "$OUT/quality_gpu.json" <<'EOF'
import json, pathlib, sys
rows, meta = {}, {}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    rows.update(d["rows"])
    meta = {k: v for k, v in d.items() if k != "rows"}
pathlib.Path(sys.argv[2]).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
print(len(rows), "rows")
EOF
    ;;
*)
    echo "usage: awq_seeds.sh start MODEL | wait SECONDS" >&2
    exit 2
    ;;
esac

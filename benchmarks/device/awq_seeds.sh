# Device side, after `source benchmarks/device/unpack_full.sh`: the paper-exact AWQ search
# and the fast variants at W3 on both models over search seeds 0-2, searched and evaluated on
# the GPU (rows say so). One AWQ search's perplexity moves by a few percent with the tokens
# it samples (quality.md), so issue #2's fast-vs-exact bar is judged on means over seeds.
#
#   bash benchmarks/device/awq_seeds.sh        # -> $OUT/quality_seeds.json and .md
#
# Merge the rows wanted into benchmarks/results/quality.json here (quality.save re-renders):
# its seed-0 `awq` rows share keys with the CPU rows there, so merge them under care (or
# leave them out); its own .md lacks the FP / RTN rows, so those checks read MISSING.
python benchmarks/quality.py --device cuda --models smollm2-135m,gemma3-270m --bits 3 \
    --methods "${METHODS:-awq-exact,awq-ls4,awq}" --seeds "${SEEDS:-0,1,2}" \
    --out "$OUT/quality_seeds.json"

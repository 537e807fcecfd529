"""Text sources for calibration and evaluation, offline first.

pydocs: Debian python3.11-doc reStructuredText sources. Calibration draws from library/,
  tutorial/ and howto/; evaluation uses the held-out reference/ and faq/.
austen: Debian r-cran-janeaustenr, decoded from R's lazy-load database. Evaluation is
  Pride and Prejudice ("austen:<novel>" picks another); calibration uses the other novels.
A local .txt or .jsonl ("text" field) serves both roles. wikitext2 and pileval need `datasets`
and a network connection.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from edgequant.config import CalibConfig
from edgequant.errors import EdgequantError
from edgequant.zoo import cache_dir

PYDOCS_SYSTEM = Path("/usr/share/doc/python3.11/html/_sources")
PYDOCS_CALIB = ("library", "tutorial", "howto")
PYDOCS_EVAL = ("reference", "faq")
AUSTEN_NOVELS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
AUSTEN_EVAL = "prideprejudice"


@dataclass(frozen=True)
class TextSource:
    name: str
    calibration: tuple[str, ...]  # documents
    evaluation: str


def debian_package(package: str) -> Path:
    """Extract a Debian package (apt-get download + dpkg-deb -x) once into the cache."""
    dest = cache_dir() / "debian" / package
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{package}."))
    try:

        def download() -> subprocess.CompletedProcess:
            return subprocess.run(
                ["apt-get", "download", package], cwd=tmp, capture_output=True, text=True
            )

        try:
            got = download()
            if got.returncode != 0:
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
                got = download()
        except FileNotFoundError:
            raise EdgequantError(f"text source needs apt-get to fetch {package}") from None
        debs = list(tmp.glob("*.deb"))
        if got.returncode != 0 or not debs:
            msg = (got.stderr.strip().splitlines() or ["no .deb"])[-1]
            raise EdgequantError(f"cannot download Debian package {package}: {msg}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], check=True)
        (tmp / "root").rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _pydocs_root() -> Path:
    if PYDOCS_SYSTEM.is_dir():
        return PYDOCS_SYSTEM
    return debian_package("python3.11-doc") / str(PYDOCS_SYSTEM).lstrip("/")


def _read_docs(root: Path, dirs: tuple[str, ...]) -> tuple[str, ...]:
    files = sorted(p for d in dirs for p in (root / d).rglob("*.rst.txt"))
    return tuple(p.read_text(encoding="utf-8", errors="replace") for p in files)


def austen_novels() -> dict[str, str]:
    """All six novels as plain text, decoded from janeaustenr's Rdata.rdb/.rdx."""
    cached = cache_dir() / "text" / "austen.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import rdata

    data = debian_package("r-cran-janeaustenr") / "usr/lib/R/site-library/janeaustenr/data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.read_rds(data / "Rdata.rdx")
        blob = (data / "Rdata.rdb").read_bytes()
        novels = {}
        for name in AUSTEN_NOVELS:
            off, length = (int(v) for v in index["variables"][name])
            raw = zlib.decompress(blob[off + 4 : off + length])
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
            novels[name] = "\n".join(str(x) for x in lines)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(novels))
    tmp.replace(cached)
    return novels


def _local(path: Path) -> tuple[str, ...]:
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise EdgequantError(
                        f"{path}:{n}: expected a JSON object with 'text'"
                    ) from None
        return tuple(docs)
    return (path.read_text(encoding="utf-8", errors="replace"),)


def _hub(name: str) -> TextSource:
    try:
        import datasets
    except ImportError:
        raise EdgequantError(
            f"{name} needs `pip install edgequant[online]` and a network"
        ) from None
    if name == "wikitext2":
        train = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        test = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return TextSource(name, ("".join(train["text"]),), "\n\n".join(test["text"]))
    val = datasets.load_dataset("mit-han-lab/pile-val-backup", split="validation")
    texts = tuple(val["text"])
    return TextSource(name, texts, "\n\n".join(texts[-2000:]))


def get_source(spec: str) -> TextSource:
    """Resolve pydocs | austen[:novel] | wikitext2 | pileval | path/to/file.{txt,jsonl}."""
    if spec == "pydocs":
        root = _pydocs_root()
        return TextSource(
            spec, _read_docs(root, PYDOCS_CALIB), "\n\n".join(_read_docs(root, PYDOCS_EVAL))
        )
    if spec == "austen" or spec.startswith("austen:"):
        novel = spec.partition(":")[2] or AUSTEN_EVAL
        if novel not in AUSTEN_NOVELS:
            raise EdgequantError(f"unknown novel {novel!r}; choose from {', '.join(AUSTEN_NOVELS)}")
        novels = austen_novels()
        calib = tuple(v for k, v in novels.items() if k != novel)
        return TextSource(spec, calib, novels[novel])
    if spec in ("wikitext2", "pileval"):
        return _hub(spec)
    path = Path(spec)
    if path.is_file():
        docs = _local(path)
        return TextSource(spec, docs, "\n\n".join(docs))
    raise EdgequantError(
        f"unknown text source {spec!r}: use pydocs, austen[:novel], wikitext2, pileval "
        "or a path to a .txt/.jsonl file"
    )


def bos_prefix(tokenizer) -> int | None:
    """The BOS id if the tokenizer adds it on its own, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def calibration_ids(
    tokenizer, cfg: CalibConfig, source: TextSource | None = None, bos: bool = False
) -> torch.Tensor:
    """Seeded sample of cfg.n_samples windows of cfg.seqlen tokens -> LongTensor [n, seqlen].

    Documents are visited in a seeded order; each gives one window per round (at a seeded
    offset), so samples spread over as many documents as possible. With `bos`, and a
    tokenizer that starts every sequence with BOS, each window is BOS + its first
    seqlen - 1 tokens, shaped like the sequences the model runs on.
    """
    ids = _sample(tokenizer, cfg, source or get_source(cfg.source))
    start = bos_prefix(tokenizer) if bos else None
    if start is not None:
        ids = torch.cat([torch.full((len(ids), 1), start), ids[:, :-1]], 1)
    return ids


def _sample(tokenizer, cfg: CalibConfig, source: TextSource) -> torch.Tensor:
    # -> [cfg.n_samples, cfg.seqlen] text token ids (see calibration_ids)
    rng = random.Random(cfg.seed)
    order = list(range(len(source.calibration)))
    rng.shuffle(order)
    pools: dict[int, list[list[int]]] = {}
    out: list[list[int]] = []
    for rnd in range(cfg.n_samples):
        for d in order:
            if d not in pools:
                ids = encode(tokenizer, source.calibration[d])
                m = len(ids) // cfg.seqlen
                off = rng.randrange(len(ids) - m * cfg.seqlen + 1)
                pool = [ids[off + j * cfg.seqlen : off + (j + 1) * cfg.seqlen] for j in range(m)]
                rng.shuffle(pool)
                pools[d] = pool
            if rnd < len(pools[d]):
                out.append(pools[d][rnd])
                if len(out) == cfg.n_samples:
                    return torch.tensor(out, dtype=torch.long)
        if all(rnd >= len(p) for p in pools.values()):
            break
    raise EdgequantError(
        f"calibration text {source.name!r} is too short: {len(out)} of {cfg.n_samples} "
        f"samples of {cfg.seqlen} tokens"
    )


def evaluation_ids(tokenizer, source: TextSource) -> torch.Tensor:
    ids = encode(tokenizer, source.evaluation)
    if len(ids) < 2:
        raise EdgequantError(f"evaluation text {source.name!r} is empty")
    return torch.tensor(ids, dtype=torch.long)

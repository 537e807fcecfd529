import pytest
import torch

from edgequant.config import CalibConfig
from edgequant.data import PYDOCS_CALIB, PYDOCS_EVAL, TextSource, calibration_ids
from edgequant.errors import EdgequantError


def test_calibration_is_seeded_and_spread(tokenizer):
    docs = tuple(f"document {d} " + " ".join(f"w{d}x{i}" for i in range(400)) for d in range(10))
    src = TextSource("t", docs, "eval")
    a = calibration_ids(tokenizer, CalibConfig(n_samples=12, seqlen=32, seed=1), src)
    b = calibration_ids(tokenizer, CalibConfig(n_samples=12, seqlen=32, seed=1), src)
    c = calibration_ids(tokenizer, CalibConfig(n_samples=12, seqlen=32, seed=2), src)
    assert a.shape == (12, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 12  # no window twice


def test_calibration_windows_start_with_bos_where_the_tokenizer_adds_it(tokenizer):
    from conftest import bos_tokenizer

    from edgequant.data import bos_prefix

    docs = tuple(f"document {d} " + " ".join(f"w{d}x{i}" for i in range(400)) for d in range(4))
    src, cfg = TextSource("t", docs, "eval"), CalibConfig(n_samples=6, seqlen=32)
    plain = calibration_ids(tokenizer, cfg, src)
    assert bos_prefix(tokenizer) is None  # this one adds no BOS: nothing changes
    assert torch.equal(calibration_ids(tokenizer, cfg, src, bos=True), plain)
    adding = bos_tokenizer()
    bos = adding.bos_token_id
    assert bos_prefix(adding) == bos
    assert torch.equal(calibration_ids(adding, cfg, src), plain)  # bos off: text windows
    first = calibration_ids(adding, cfg, src, bos=True)
    assert first.shape == plain.shape and (first[:, 0] == bos).all()
    assert torch.equal(first[:, 1:], plain[:, :-1])


def test_too_short_raises(tokenizer):
    src = TextSource("t", ("tiny text",), "eval")
    with pytest.raises(EdgequantError, match="too short"):
        calibration_ids(tokenizer, CalibConfig(n_samples=2, seqlen=64), src)


def test_pydocs_eval_never_overlaps_calibration():
    assert not set(PYDOCS_CALIB) & set(PYDOCS_EVAL)

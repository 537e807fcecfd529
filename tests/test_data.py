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


def test_too_short_raises(tokenizer):
    src = TextSource("t", ("tiny text",), "eval")
    with pytest.raises(EdgequantError, match="too short"):
        calibration_ids(tokenizer, CalibConfig(n_samples=2, seqlen=64), src)


def test_pydocs_eval_never_overlaps_calibration():
    assert not set(PYDOCS_CALIB) & set(PYDOCS_EVAL)

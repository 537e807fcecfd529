"""Frozen configuration dataclasses, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgequant.errors import EdgequantError


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only group-wise integer quantization.

    group_size -1 means one group per output channel (per-channel).
    zero_point True is asymmetric (min/max, unsigned codes with a zero point);
    False is symmetric (signed codes, scale = absmax / (2^(bits-1) - 1)).
    """

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise EdgequantError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise EdgequantError(
                "group size must be a positive integer or -1 (per-channel), "
                f"got {self.group_size!r}"
            )

    def groups_for(self, in_features: int, name: str = "linear") -> int:
        """Number of groups along in_features; raises if the group size does not divide it."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise EdgequantError(
                f"group size {self.group_size} does not divide in_features {in_features} of {name}"
            )
        return in_features // self.group_size

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


W3_LOSS_SAMPLES = 32  # AWQConfig.loss_samples at 3 bits when left to the default


@dataclass(frozen=True)
class AWQConfig:
    """AWQ scale search (Lin et al. 2024, sec. 3.2) and weight-clipping search.

    search "fast": per-linear output error in second-order form, tr(D G D^T) with
    G = X^T X on `gram_tokens` sampled tokens (exact for single-linear groups); in groups of
    several linears each output row's error can be weighted by its sensitivity to the
    inspected module's output (`sensitivity_samples`).
    search "exact": the paper's loss, MSE of the inspected module's output on all tokens.
    At 3 bits the fast search scores groups of several linears by the module output on a few
    samples instead (`loss_samples`, see `resolved`).
    """

    n_grid: int = 20
    duo_scaling: bool = False
    gqa_fold: bool = False  # also scale v_proj -> o_proj under GQA (peers skip it)
    search: str = "fast"
    gram_tokens: int = 8192
    # fast search, single-linear groups (down_proj): the Gram form on every calibration
    # token, as the exact search scores them (True), or on the gram_tokens sample (False).
    # None: chosen by the width (`resolved`): True at 3 bits, else False (and False for the
    # exact search, which scores every token anyway, or with sensitivity_samples)
    single_all_tokens: bool | None = None
    # fast search, groups of several linears: > 0 scores s by the inspected module's output
    # (the exact loss) on this many calibration samples instead of the Gram form (0).
    # None: chosen by the width (`resolved`): W3_LOSS_SAMPLES at 3 bits, else 0 (and 0 for
    # the exact search or with sensitivity_samples)
    loss_samples: int | None = None
    # fast search, groups of several linears: > 0 weights each output row's Gram error by
    # that row's sensitivity, mean (dO/dy)^2 of the inspected module's output O w.r.t. the
    # row's output y, estimated with random probes on this many samples. Off by default:
    # W3 within 1% of the exact search on SmolLM2 with 8, but +13% on Gemma 3 (quality.md)
    sensitivity_samples: int = 0
    # fast search only: block forwards as bf16 matmuls, fp32 accumulate. None: where bf16 is
    # fast on the model's device (calibrate.bf16_is_fast), else float32
    bf16_matmul: bool | None = None
    clip: bool = True
    clip_form: str = "asym"
    # also clip the linears the published search skips (q/k); each row's clip is kept only
    # where it lowers that row's error on the Gram sample (quality.md: awq-gram vs awq-qkskip)
    clip_all: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.search not in ("fast", "exact"):
            raise EdgequantError(f"search must be 'fast' or 'exact', got {self.search!r}")
        if self.clip_form not in ("sym", "asym"):
            raise EdgequantError(f"clip form must be 'sym' or 'asym', got {self.clip_form!r}")
        if self.n_grid < 1 or self.clip_grid < 1:
            raise EdgequantError("grid sizes must be positive")
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise EdgequantError(f"clip max shrink must be in [0, 1), got {self.clip_max_shrink}")
        if (self.loss_samples or 0) < 0 or self.sensitivity_samples < 0:
            raise EdgequantError("loss_samples and sensitivity_samples must be >= 0")
        if self.search == "exact" and (self.loss_samples or self.sensitivity_samples):
            raise EdgequantError(
                "loss_samples and sensitivity_samples shape the fast search; the exact search "
                "scores every sample"
            )
        if (self.loss_samples or 0) > 0 and self.sensitivity_samples > 0:
            raise EdgequantError(
                "sensitivity_samples weights the Gram form, which loss_samples replaces; "
                "set one of them to 0"
            )

    def resolved(self, bits: int, bf16_fast: bool) -> AWQConfig:
        """This config with the settings left to None fixed for `bits`-bit weights on a
        device where bfloat16 matmuls are (`bf16_fast`) or are not fast.

        loss_samples: W3_LOSS_SAMPLES at 3 bits for the fast search without sensitivity
        weights, else 0; single_all_tokens: True there, else False.
        At 3 bits q/k/v and gate/up scored by the module output on 4 samples had the lower
        mean perplexity than the Gram form in every comparison with bf16 block forwards on
        the H100 (quality_gpu.md), and the Gram form picks the paper's alpha in 17-27 % of
        those groups, the module loss in 67-87 % (awq_objective.json); still, SmolLM2 W3
        stayed 2.4 % above the exact search on Austen (paired by seed). With 32 samples and
        down_proj on every token the means over seeds are within 1 % on both models and
        texts (quality.md, awq rows from a034f34: SmolLM2 seeds 0-6, +0.5 % / +0.3 %, s.e.
        1.2 %; Gemma seeds 0-1 against exact seed 0), at 2.5-3x the W3 search time. At 4
        bits the Gram form is already within 1 % of the exact search and keeps the 3-minute
        budget; 2 bits is not measured with either.
        bf16_matmul: `bf16_fast` where left to None; always False for the exact search.
        """
        w3 = bits == 3 and self.search == "fast" and not self.sensitivity_samples
        ls, every = self.loss_samples, self.single_all_tokens
        ls = (W3_LOSS_SAMPLES if w3 else 0) if ls is None else ls
        every = w3 if every is None else every
        bf16 = bf16_fast if self.bf16_matmul is None else self.bf16_matmul
        fast_bf16 = bf16 and self.search == "fast"
        return replace(self, loss_samples=ls, single_all_tokens=every, bf16_matmul=fast_bf16)


@dataclass(frozen=True)
class CalibConfig:
    """Calibration text: n_samples blocks of seqlen tokens drawn with a fixed seed."""

    source: str = "pydocs"
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.seqlen < 2:
            raise EdgequantError(
                "calibration needs n_samples >= 1 and seqlen >= 2, "
                f"got {self.n_samples}, {self.seqlen}"
            )


STATIC_METHODS = ("static-rtn", "smoothquant", "mobilequant")  # integer-only W8A8 / W4A8
STATIC_QUANT_METHOD = "edgequant-static"  # quant_method of integer-only checkpoints


RANGES = ("minmax", "mse")  # how static activation ranges are set (StaticConfig.ranges)
LOSSES = ("fisher", "hidden")  # MobileQuant's training loss (edgequant.objective)
CLIP_SEARCHES = ("output", "weight", "off")  # where MobileQuant's weight clipping starts


@dataclass(frozen=True)
class StaticConfig:
    """Integer-only weight + activation quantization with static per-tensor activation ranges.

    Weights: w_bits 8 -> per-tensor asymmetric, except the architecture's per-channel list
    (down_proj); w_bits 4 -> per-channel, asymmetric or symmetric (w_symmetric).
    Activations: the architecture's precision map gives each quantization point 8 or 16
    bits; a_bits 16 lifts the 8-bit points to 16 as well. Asymmetric, one range per tensor.
    SmoothQuant's alpha: 0.5 (the SmoothQuant paper's default); None grid-searches it per
    scale group (alpha_grid points in [0, 1)) on the group's own output error, which lost to
    0.5 on both SmolLM2-135M and Gemma-3-270M W8A8 (w8a8.md).
    ranges: how activation ranges are set from calibration, "minmax" or "mse" (8-bit points
    take the range of least squared error, see edgequant.static.observe_ranges); None: the
    method's own (static-rtn min/max; smoothquant and mobilequant mse).
    calib_bos: calibration windows start with BOS where the tokenizer starts sequences with
    it (Gemma-3; SmolLM2's adds none), as evaluation windows and generation do; without
    it, Gemma-3-270M W8A8 SmoothQuant read 27.56 against 26.41 on Austen (w8a8.md).
    """

    w_bits: int = 8
    a_bits: int = 8
    w_symmetric: bool = False
    alpha: float | None = 0.5
    alpha_grid: int = 20
    search_tokens: int = 4096  # token sample for the alpha search
    ranges: str | None = None
    calib_bos: bool = True

    def __post_init__(self) -> None:
        if self.w_bits not in (4, 8):
            raise EdgequantError(f"static quantization takes w_bits 4 or 8, got {self.w_bits!r}")
        if self.a_bits not in (8, 16):
            raise EdgequantError(f"static quantization takes a_bits 8 or 16, got {self.a_bits!r}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise EdgequantError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")
        if self.alpha_grid < 1 or self.search_tokens < 1:
            raise EdgequantError("alpha_grid and search_tokens must be positive")
        if self.ranges is not None and self.ranges not in RANGES:
            raise EdgequantError(f"ranges must be one of {RANGES}, got {self.ranges!r}")


@dataclass(frozen=True)
class MobileQuantConfig:
    """MobileQuant's end-to-end training (Tan et al. 2024), on top of SmoothQuant.

    Learned jointly: equivalent-transformation scales (SmoothQuant's pairs, initialised to 1,
    kept >= min_scale), weight clipping (sigmoid of a logit times the weight's min / max,
    per output channel or per tensor, logits initialised to clip_init) and the activation
    ranges (relative to their observed width; 8-bit points, and 16-bit ones with
    learn_a16). Loss: the last hidden state's error against the float model's on the same
    calibration windows, plain MSE (loss "hidden", the issue's and paper's form) or weighted
    by the lm_head's Fisher information (loss "fisher": the second-order term of the KL
    between float and quantized predictions; edgequant.objective). AdamW without weight
    decay, one learning rate per parameter group, cosine decay. Defaults fit a 2-core CPU;
    the paper trains 1024 x 2048 tokens for 60 epochs.
    """

    epochs: int = 4
    # calibration windows per step. At the same tokens, more and smaller steps won: Gemma 3
    # W8A8, 4 epochs, batch 4 / 2 / 1 (32 / 64 / 128 steps): Austen 24.82 / 24.58 / 24.10
    batch: int = 1
    # calibration windows trained on, evenly spaced (0: all of them); 32 x 4 epochs keeps
    # a SmolLM2-135M run on this 2-core CPU under 30 minutes (w8a8.md)
    windows: int = 32
    # From SmoothQuant at alpha 0.5 with mse ranges, with the 16-bit ranges learned too, these
    # rates diverged on SmolLM2 W8A8 (Austen 216.6); kept as observed, they gave 23.85
    # (0.3x with them learned: 24.13) and Gemma 26.17 (26.83) under loss=hidden without the
    # clip search or BOS windows; with them (2 epochs of 4-window steps), 23.74 and 24.89
    # (Gemma: unweighted search); at today's epochs and batch, Gemma 24.10
    lr_scale: float = 1e-2
    lr_clip: float = 1e-1
    lr_range: float = 1e-2
    # learn the ranges of 16-bit points too: their rounding is already fine, and learning
    # them let the rates above diverge on SmolLM2 (w8a8.md)
    learn_a16: bool = False
    # "fisher": the hidden-state error weighted as the lm_head's predictions feel it (the
    # KL's second-order term, nats per token); "hidden": plain MSE, which a few massive
    # channels dominate (edgequant.objective)
    loss: str = "fisher"
    clip_per_channel: bool = True
    clip_init: float = 4.0
    # where the clipping starts: "output", the ratio of least squared rounding error of each
    # weight (per tensor or row), columns weighted by their input's mean square, searched
    # from sigmoid(clip_init) down; "weight": the same, unweighted; "off": at clip_init
    clip_search: str = "output"
    min_scale: float = 1e-2
    save_every: int = 10  # steps between resumable checkpoints (with a state path)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch < 1 or self.save_every < 1:
            raise EdgequantError("epochs, batch and save_every must be positive")
        if self.windows < 0:
            raise EdgequantError(f"windows must be >= 0 (0: all), got {self.windows}")
        if self.loss not in LOSSES:
            raise EdgequantError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.clip_search not in CLIP_SEARCHES:
            raise EdgequantError(
                f"clip_search must be one of {CLIP_SEARCHES}, got {self.clip_search!r}"
            )
        if min(self.lr_scale, self.lr_clip, self.lr_range) < 0:
            raise EdgequantError("learning rates must be >= 0")
        if self.min_scale <= 0:
            raise EdgequantError(f"min_scale must be positive, got {self.min_scale}")

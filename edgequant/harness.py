"""lm-evaluation-harness adapter: edgequant models as the `edgequant` model of lm_eval.

    python -m edgequant.harness --model edgequant --model_args path=DIR --tasks arc_easy
    edgequant eval DIR --tasks arc_easy,hellaswag [--include-path TASK_DIR]

`path` is anything edgequant.zoo.load takes: a zoo name, a float model directory, a
fake-quantized directory or a packed checkpoint (its QuantLinear modules run the reference
kernel), so the harness scores exactly the weights edgequant wrote. loglikelihood,
loglikelihood_rolling and generate_until come from lm_eval's HF model class. lm_eval has no
plugin discovery for models, so the CLI above is lm_eval's own, with `edgequant` registered
first; offline, tasks defined over local files come in through --include_path.
"""

from __future__ import annotations

import sys

from edgequant.errors import EdgequantError


def _hflm():
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise EdgequantError(
            "lm-evaluation-harness is not installed: pip install 'edgequant[eval]'"
        ) from None
    return HFLM


def register() -> type:
    """Register the `edgequant` model with lm_eval (idempotent); returns the class."""
    from lm_eval.api.registry import model_registry

    hflm = _hflm()
    if "edgequant" in model_registry:
        return model_registry.get("edgequant")

    class EdgequantLM(hflm):
        """lm_eval's HF causal LM over a model loaded by edgequant (CPU, float32 compute)."""

        def __init__(self, path: str, batch_size: int | str = 1, max_length: int | None = None,
                     **kwargs):  # fmt: skip
            from edgequant.zoo import load

            model, tok = load(path)
            super().__init__(
                pretrained=model,
                tokenizer=tok,
                backend="causal",
                batch_size=batch_size,
                max_length=max_length,
                device="cpu",
                **kwargs,
            )

    model_registry.register("edgequant")(EdgequantLM)
    return EdgequantLM


def evaluate(
    path: str,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 1,
) -> dict:
    """lm_eval's simple_evaluate on an edgequant model; returns its results dict."""
    _hflm()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cls = register()
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EdgequantError(f"unknown lm_eval task(s): {', '.join(unknown)}")
    return simple_evaluate(
        model=cls(path, batch_size=batch_size), tasks=tasks, task_manager=manager, limit=limit
    )


def main() -> None:
    """lm_eval's command line with the `edgequant` model registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()

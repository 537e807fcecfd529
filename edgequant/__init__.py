"""edgequant: AWQ and MobileQuant low-bit quantization for small language models."""

from edgequant.api import quantize
from edgequant.config import AWQConfig, CalibConfig, QuantConfig
from edgequant.errors import EdgequantError
from edgequant.recipe import Recipe, apply_recipe

__all__ = [
    "AWQConfig",
    "CalibConfig",
    "EdgequantError",
    "QuantConfig",
    "Recipe",
    "apply_recipe",
    "quantize",
]
__version__ = "0.1.0"

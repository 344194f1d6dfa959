"""jlora: LoRA fine-tuning for JAX as a function transformation."""

from jlora.errors import (LoraCheckpointError, LoraError, LoraFileError, LoraLayoutError,
                          LoraMaterializeWarning, LoraPeftError, LoraSpecError, LoraTreeError)
from jlora._paths import path_str
from jlora.interpreter import lora
from jlora.layouts import infer_layouts
from jlora.merge import frozen_like, merge, unmerge
from jlora.lora_param import LoraParam
from jlora.transform import lora_transform
from jlora.optim import optimizer
from jlora.layout import Layout
from jlora.spec import LoraSpec
from jlora.summary import LoraSummary, summary
from jlora import base, orbax, peft

__version__ = "0.1.0"

__all__ = [
    "Layout",
    "LoraCheckpointError",
    "LoraError",
    "LoraFileError",
    "LoraLayoutError",
    "LoraMaterializeWarning",
    "LoraParam",
    "LoraPeftError",
    "LoraSpec",
    "LoraSpecError",
    "LoraSummary",
    "LoraTreeError",
    "frozen_like",
    "infer_layouts",
    "lora",
    "lora_transform",
    "merge",
    "optimizer",
    "path_str",
    "summary",
    "unmerge",
    "base",
    "orbax",
    "peft",
]

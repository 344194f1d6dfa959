"""jlora: LoRA fine-tuning for JAX as a function transformation."""

from importlib import metadata as _metadata

from jlora.errors import (LoraCheckpointError, LoraError, LoraFileError, LoraLayoutError,
                          LoraMaterializeWarning, LoraPeftError, LoraSpecError, LoraTreeError)
from jlora._paths import path_str
from jlora.base_files import load_params, save_params
from jlora.checkpoint import (CheckpointManager, adapter_metadata,
                              load_adapter, save_adapter)
from jlora.interpret import infer_layouts, lora
from jlora.merge import frozen_like, merge, unmerge
from jlora.lora_param import LoraParam
from jlora.transform import lora_transform
from jlora.peft import PeftAdapter, PeftRules, load_peft, save_peft
from jlora.optim import optimizer
from jlora.layout import Layout
from jlora.spec import LoraSpec
from jlora.summary import LoraSummary, summary
from jlora.quant import NF4Array, dequantize, quantize
from jlora.merge import RequantizeReport
from jlora.summary import MemoryTable

try:
  __version__ = _metadata.version("jlora")
except _metadata.PackageNotFoundError:   # a source tree that was never installed
  __version__ = "0+unknown"

__all__ = [
    "CheckpointManager",
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
    "MemoryTable",
    "NF4Array",
    "PeftAdapter",
    "PeftRules",
    "RequantizeReport",
    "adapter_metadata",
    "dequantize",
    "frozen_like",
    "infer_layouts",
    "load_adapter",
    "load_params",
    "load_peft",
    "lora",
    "lora_transform",
    "merge",
    "optimizer",
    "path_str",
    "quantize",
    "save_adapter",
    "save_params",
    "save_peft",
    "summary",
    "unmerge",
]

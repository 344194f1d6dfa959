"""jlora: LoRA fine-tuning for JAX as a function transformation.

The core is at the top level: ``LoraSpec``, ``lora_transform``, ``lora``,
``merge``/``unmerge``, ``optimizer``, ``summary``, ``infer_layouts``, banks of
adapters and ``combine``, ``quantize``/``dequantize``, and the errors. The
file formats are namespaces: ``jlora.orbax`` (adapters and training
checkpoints), ``jlora.peft`` (PEFT adapter folders), ``jlora.base``
(base-parameter files, quantized or not), ``jlora.bnb`` (Hugging Face
bitsandbytes 4-bit checkpoints) and ``jlora.hf`` (Hugging Face checkpoints
into JAX models, dense, 4-bit or quantized as they load). ``jlora.nnx`` adapts a Flax NNX module in
NNX's idiom; it is imported on first use (it needs Flax).

The 0.1 names of the file functions (``jlora.save_adapter``,
``jlora.save_peft``, ...) still resolve, with a ``DeprecationWarning`` naming
their new place, until 0.3 (``jlora._deprecated``; see CHANGELOG.md).
"""

from jlora import base, bnb, hf, orbax, peft
from jlora import _deprecated
from jlora._version import __version__
from jlora._paths import path_str
from jlora.adapters import (Adapter, Combination, DoraParam, LoraBank, LoraParam, combine,
                            relative_to_original, select_adapter, stack_adapters)
from jlora.errors import (LoraCheckpointError, LoraError, LoraFileError, LoraLayoutError,
                          LoraMaterializeWarning, LoraPeftError, LoraSpecError, LoraTreeError)
from jlora.interpret import infer_layouts, lora
from jlora.layout import Layout
from jlora.merge import frozen_like, merge, unmerge
from jlora.optim import freeze_a, lora_fa, lora_plus, optimizer
from jlora.plan import Plan, plan
from jlora.sharding import TrainShardings, shardings
from jlora.spec import LoraSpec
from jlora.summary import LoraSummary, summary
from jlora.quant import NF4Array, dequantize, quantize
from jlora.merge import RequantizeReport
from jlora.summary import MemoryTable
from jlora.transform import lora_transform

__all__ = [
    # the transform
    "LoraSpec",
    "Layout",
    "lora_transform",
    "lora",
    "infer_layouts",
    "merge",
    "unmerge",
    "frozen_like",
    "optimizer",
    "lora_plus",
    "lora_fa",
    "freeze_a",
    "shardings",
    "TrainShardings",
    "plan",
    "Plan",
    "summary",
    "LoraSummary",
    "MemoryTable",
    "path_str",
    # quantized bases
    "quantize",
    "dequantize",
    "NF4Array",
    "RequantizeReport",
    # adapters
    "Adapter",
    "LoraParam",
    "DoraParam",
    "LoraBank",
    "stack_adapters",
    "select_adapter",
    "combine",
    "Combination",
    "relative_to_original",
    # errors
    "LoraError",
    "LoraSpecError",
    "LoraLayoutError",
    "LoraTreeError",
    "LoraFileError",
    "LoraCheckpointError",
    "LoraPeftError",
    "LoraMaterializeWarning",
    # file formats
    "base",
    "bnb",
    "hf",
    "orbax",
    "peft",
]

# 0.1's names, forwarded with a DeprecationWarning; not in __all__ or dir().
# jlora.nnx imports Flax, which jlora does not need otherwise: it is loaded on
# first use (``jlora.nnx.lora`` after ``import jlora``), not at import.
__getattr__ = _deprecated.module_getattr(__name__, _deprecated.TOP_LEVEL, lazy=("nnx",))

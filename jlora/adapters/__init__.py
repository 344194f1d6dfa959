"""The adapter kinds: the trainable leaves that adapt frozen weights.

Every kind derives from ``Adapter`` (``adapter.py``: the base class and the
registry of kind names the file formats store) and is a pytree node whose
arrays are leaves and whose scale and layout are static:

* ``LoraParam`` (``lora_param.py``): one low-rank pair, ``W0 + s B A``;
* ``DoraParam`` (``dora.py``): a pair and a per-column magnitude (DoRA);
* ``LoraBank`` (``bank.py``): several adapters of one base stacked, used per
  example; ``stack_adapters`` builds one, ``select_adapter`` takes one out.

Beside them: ``inits.py`` makes initial factors (PEFT's, PiSSA, OLoRA,
LoftQ; ``relative_to_original`` for an init that rewrote W0), and
``combine.py`` makes one adapter of several (``combine``, ``Combination``).
The same names are at the top level (``jlora.LoraParam``, ...); the
interpreter's view of each kind is its term in ``jlora/interpret/``. A new
kind registers its name with ``register_kind``.

Example:
  >>> import jax.numpy as jnp, jlora
  >>> from jlora import adapters
  >>> pair = adapters.LoraParam(jnp.ones((4, 2)), jnp.zeros((2, 3)), scale=0.5,
  ...                           layout=jlora.Layout((0,), (1,)))
  >>> adapters.is_adapter(pair), pair.kind, pair.rank
  (True, 'lora', 2)
"""

from jlora.adapters.adapter import Adapter, is_adapter, register_kind
from jlora.adapters.lora_param import LoraParam
from jlora.adapters.dora import DoraParam
from jlora.adapters.bank import LoraBank, select_adapter, stack_adapters
from jlora.adapters.inits import relative_to_original
from jlora.adapters.combine import Combination, combine

__all__ = [
    "Adapter",
    "is_adapter",
    "register_kind",
    "LoraParam",
    "DoraParam",
    "LoraBank",
    "stack_adapters",
    "select_adapter",
    "relative_to_original",
    "combine",
    "Combination",
]

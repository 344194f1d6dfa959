"""The interpreter behind ``jlora.lora`` and ``jlora.infer_layouts``.

``values`` defines what flows where an adapted weight flows (a base weight
and adapter terms), ``dense``, ``nf4`` and ``lora_term`` the kinds jlora ships,
``rules`` what each primitive does to a value, ``interpreter`` the jaxpr
evaluation, ``lora`` and ``layouts`` the two entry points.
"""

from jlora.interpret import bank_term, dense, dora_term, lora_term, nf4  # noqa: F401  (the kinds)
from jlora.interpret.layouts import infer_layouts
from jlora.interpret.lora import lora

__all__ = ["infer_layouts", "lora"]

"""Import: a PEFT LoRA adapter folder as jlora factors (``jlora.peft.load``).

Only JSON and safetensors are read (``safetensors.numpy``): no torch, no
pickle, no code from the folder runs. Every option, key, shape and rank is
checked before anything is returned; no factor is ever left at an initial
value.

``load`` runs the steps, each in its own module: ``folder`` reads the folder
and sorts its tensors by role, ``match`` finds the parameter each module
adapts, ``assemble`` builds each weight's factors, their dtype and the
``LoraSpec``, ``checks`` holds the file to its own ``fan_in_fan_out``, to
what the config targets and to the base's weights, ``full_weights`` reads
``modules_to_save``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp

from jlora._paths import flatten_with_paths
from jlora.adapters.dora import DoraParam
from jlora.errors import LoraPeftError
from jlora.layout import Layout
from jlora.adapters.lora_param import LoraParam
from jlora.spec import LoraSpec
from jlora.peft import assemble, checks, folder, full_weights, fused, match, names
from jlora.peft.rules import RulesLike, as_rules


class Adapter(NamedTuple):
  """What ``jlora.peft.load`` returns.

  Attributes:
    frozen: the base parameters with None at the weights trained in full,
      ready for ``jlora.lora(fn)(frozen, trainable, ...)``.
    trainable: LoraParam at each adapted weight, the ``modules_to_save``
      weights, None elsewhere.
    spec: a ``LoraSpec`` describing the adapter (exact paths as targets,
      rank/alpha per path, use_rslora, dropout, layouts), which ``jlora.peft.save``
      accepts to write the folder back.
    config: the ``adapter_config.json`` contents.
  """

  frozen: Any
  trainable: Any
  spec: LoraSpec
  config: dict[str, Any]


def load(path: str | os.PathLike, params: Any, rules: RulesLike, *,
         layouts: Mapping[str, Layout] | None = None,
         dtype: Any = None) -> Adapter:
  """Reads a PEFT LoRA adapter folder into jlora factors for ``params``.

  The inverse of ``jlora.peft.save``: ``lora_A (r, in)`` and ``lora_B (out, r)``
  become ``LoraParam(a (in, r), b (r, out))`` laid out as ``layouts`` says (a
  2-D kernel as the rules' ``kernel_order`` says, checked against the
  file's shapes; with no kernel order, a square kernel is refused rather
  than guessed), modules ``<prefix>.{i}.<name>`` of a stacked weight are
  stacked along its stack axis, and ``modules_to_save`` tensors become
  plain trainable leaves. Module names are resolved by applying ``rules`` to
  every parameter path of ``params``, so only the forward rule is needed.
  A folder with ``use_dora`` gives ``DoraParam`` leaves (its
  ``lora_magnitude_vector`` as their magnitude); ``lora_embedding_A/B``,
  convolution factors and ``target_parameters`` (fused experts) are read in
  PEFT's layout for each (``jlora.peft.kinds``); a tied table (``Rules.tied``)
  must be adapted in all its uses (``ensure_weight_tying``); the copies of
  base weights PEFT saves with an adapted embedding must equal ``params``'.

  The folder is validated before anything is returned: every
  ``adapter_config.json`` option that would change the adapter's function
  and that jlora lacks (``bias != "none"``, a non-LoRA ``peft_type``,
  PiSSA-style inits, ...), every key that maps to no parameter, every
  module that ``target_modules`` or ``modules_to_save`` selects and the file
  lacks, every shape and rank mismatch raises ``LoraPeftError`` naming the
  key. No factor is ever left at an initial value. A folder jlora wrote
  carries checksums of its tensors and options, which are verified. Only
  JSON and safetensors are read; torch is not needed.

  Args:
    path: the adapter folder.
    params: the base parameters (or the ``frozen`` tree of an earlier
      ``lora_transform``) of the Flax model that corresponds to the PyTorch
      base model.
    rules: how parameter paths name PyTorch modules (``jlora.peft.Rules`` or
      a function), as for ``jlora.peft.save``.
    layouts: path -> Layout, best from the model itself
      (``jlora.infer_layouts(fn, params, *args)``); it wins over the rules'
      ``kernel_order`` for 2-D kernels and is needed for
      ``nn.scan`` stacks and multi-axis kernels. Where it says nothing, the
      rules' own ``layouts`` apply (``Rules.tunix`` states them). The modules
      of a fused kernel (``Rules``: ``...k_proj+v_proj``) must all be in the
      folder; they are joined into one adapter (``jlora.peft.fused``).
    dtype: dtype of A and B. By default the file's, promoted so that no value
      changes (float16 and float32 factors give float32); a narrower dtype is
      refused if a value would become infinite in it.

  Returns:
    ``Adapter(frozen, trainable, spec, config)``.

  Raises:
    LoraPeftError: the folder is not an adapter jlora can load faithfully.
    LoraLayoutError: an adapted weight has no layout, or a square kernel's
      cannot be known.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile
    >>> params = {"fc": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    >>> spec = jlora.LoraSpec(rank=2, alpha=4, targets=["fc/kernel"])
    >>> _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> folder = tempfile.mkdtemp()
    >>> _ = jlora.peft.save(folder, trainable, jlora.peft.Rules())
    >>> adapter = jlora.peft.load(folder, params, jlora.peft.Rules())
    >>> adapter.trainable["fc"]["kernel"].a.shape, adapter.spec.scale_for("fc/kernel")
    ((8, 2), 2.0)
  """
  directory = os.fspath(path)
  rules = as_rules(rules)
  config, tensors = folder.read(directory)
  weights = os.path.join(directory, names.WEIGHTS_NAME)
  lora, full, copies = folder.parse_keys(tensors, config, weights)
  if not lora:
    raise LoraPeftError(f"'{weights}' holds no lora_A/lora_B tensors")
  pairs, treedef = flatten_with_paths(params)
  index = match.Index(pairs, rules)
  layouts = {**rules.layouts_for([p for p, leaf in pairs if leaf is not None]),
             **(layouts or {})}
  # The modules of a fused kernel become one (their rank and alpha in `joined`).
  lora, joined = fused.join(lora, index, config, weights)
  found = match.lora_modules(lora, index, joined, rules, weights)
  checks.fan_in_fan_out(found, config, rules, os.path.join(directory, names.CONFIG_NAME))
  factors = {i: assemble.weight_factors(entry, by_idx, layouts, rules, weights)
             for i, (entry, by_idx) in found.items()}
  checks.targets_covered(index, found, config, weights)
  checks.base_copies(copies, index, rules, layouts, weights)
  extras = full_weights.leaves(full, index, found, config, rules, weights, layouts)

  factor_dtype = assemble.factor_dtype(factors, dtype, {pairs[i][0]: i for i in factors}, found,
                                        weights)
  spec = assemble.spec_of(joined, {pairs[i][0]: f for i, f in factors.items()},
                          sorted(pairs[i][0] for i in extras), factor_dtype,
                          os.path.join(directory, names.CONFIG_NAME))
  frozen = [leaf for _, leaf in pairs]
  trainable: list[Any] = [None] * len(pairs)
  for i, (layout, a, b, _, _, m) in factors.items():
    common = dict(a=jnp.asarray(a, factor_dtype), b=jnp.asarray(b, factor_dtype),
                  scale=spec.scale_for(pairs[i][0]), layout=layout, dropout=float(spec.dropout))
    trainable[i] = (LoraParam(**common) if m is None
                    else DoraParam(magnitude=jnp.asarray(m, factor_dtype), **common))
  for i, value in extras.items():
    trainable[i], frozen[i] = value, None
  return Adapter(treedef.unflatten(frozen), treedef.unflatten(trainable), spec, dict(config))

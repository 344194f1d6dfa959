"""``jlora.bnb.load``: a bitsandbytes 4-bit checkpoint as Flax parameters.

Every entry of the checkpoint is mapped to a parameter of ``like`` (and
every parameter to its entries): a quantized weight becomes an
``NF4Array`` of the file's bytes, any other entry a plain array in the
parameter's layout. Nothing is left over and nothing is guessed.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jlora._paths import flatten_with_paths
from jlora.bnb import quant_state
from jlora.bnb.files import Files, PathLike
from jlora.bnb.mapping import Name, check_layout, kernel_layout, param_name, to_flax
from jlora.bnb.quant_state import Scan, State
from jlora.errors import LoraFileError
from jlora.layout import Layout
from jlora.peft import names
from jlora.peft.rules import Rules, RulesLike, as_rules
from jlora.quant import nf4_files
from jlora.quant.nf4 import NF4Array


def load(path: PathLike, like: Any, rules: RulesLike, *,
         layouts: Mapping[str, Layout] | None = None) -> Any:
  """Reads a Hugging Face bitsandbytes 4-bit checkpoint into Flax parameters.

  Each quantized PyTorch weight becomes a ``jlora.NF4Array`` holding the
  file's bytes as they are (the codes, absmax codes, nested scales and
  offset); every other entry becomes a plain array, a kernel transposed
  (and reshaped, for a multi-axis kernel) to the Flax layout. Run the model
  with ``jlora.lora``: each NF4 weight is dequantized where it is used.

  Args:
    path: a ``.safetensors`` file, or a folder with ``model.safetensors`` or
      ``model.safetensors.index.json`` and its shards (what
      ``save_pretrained`` writes).
    like: the Flax parameters (``jax.ShapeDtypeStruct`` leaves will do, e.g.
      ``FlaxLlamaForCausalLM(config, _do_init=False).params_shape_tree``):
      the result has its structure, and every leaf must be in the file with
      its shape. Leaves come back in the file's dtype (a quantized weight's
      ``dtype`` is the one its quant state names: what dequantizing gives).
      A leaf that is an ``NF4Array`` lends its layout.
    rules: how parameter paths name PyTorch modules (``jlora.peft.Rules``,
      e.g. ``Rules.llama()``, or a function), as for ``jlora.peft.load``.
    layouts: path -> ``jlora.Layout`` for kernels that are not plain 2-D
      ``(in, out)`` or ``(out, in)`` kernels as the rules' ``kernel_order``
      says (multi-axis kernels; the file's shapes are checked against it).

  Returns:
    The parameter tree, with ``NF4Array`` leaves for the quantized weights.

  Raises:
    LoraFileError: the file is not a 4-bit NF4 checkpoint jlora reads
      faithfully (FP4 or 8-bit weights, another quant map, a malformed
      quant state), an entry is missing or left over, or a shape does not
      fit ``like``; the message names the entry.

  Example:
    >>> import jax, jax.numpy as jnp, tempfile, jlora
    >>> params = jlora.quantize({"fc": {"kernel": jnp.ones((128, 64)), "bias": jnp.ones(64)}})
    >>> f = jlora.bnb.save(f"{tempfile.mkdtemp()}/model.safetensors", params,
    ...                    jlora.peft.Rules.generic())
    >>> back = jlora.bnb.load(f, params, jlora.peft.Rules.generic())
    >>> back["fc"]["kernel"]
    NF4Array(shape=(128, 64), dtype=float32, double_quant, block_size=64, layout=Layout(in_axes=(0,), out_axes=(1,), stack_axes=()))
  """
  files = Files(path)
  rules = as_rules(rules)
  scan = quant_state.scan(files)
  dense = set(scan.dense)
  pairs, treedef = flatten_with_paths(like)
  used: dict[str, str] = {}
  leaves = []
  for p, leaf in pairs:
    if leaf is None:
      leaves.append(None)
      continue
    leaves.append(_load_leaf(files, scan, dense, p, leaf, rules, layouts or {}, used))
  unused = [k for k in list(scan.states) + scan.dense if k not in used]
  if unused:
    raise LoraFileError(f"'{files.where}' has entries no parameter of `like` maps to under "
                        f"these rules: {unused[:3]}{' ...' if len(unused) > 3 else ''}")
  return treedef.unflatten(leaves)


def _load_leaf(files: Files, scan: Scan, dense: set, p: str, leaf: Any, rules: Rules,
               layouts: Mapping[str, Layout], used: dict[str, str]) -> Any:
  where = f"'{files.where}'"
  shape = tuple(int(d) for d in leaf.shape)
  name = param_name(p, rules, where)
  n = names.n_stack(name.template)
  explicit = layouts.get(p) or (leaf.layout if isinstance(leaf, NF4Array) else None)
  stack_axes = explicit.stack_axes if explicit is not None else tuple(range(n))
  if len(stack_axes) != n or n > len(shape):
    raise LoraFileError(f"{where}: '{p}' {shape} has {len(stack_axes)} stack axes, but the "
                        f"rules name its module '{name.template}' with {n} stack indices")
  lead = tuple(shape[a] for a in stack_axes)
  index = list(np.ndindex(*lead))
  keys = [name.key(i) for i in index]
  for k in keys:
    if k in used:
      raise LoraFileError(f"{where}: '{k}' is mapped to both '{used[k]}' and '{p}'")
    if k not in scan.states and k not in dense:
      near = difflib.get_close_matches(k, list(scan.states) + scan.dense, n=3, cutoff=0.0)
      raise LoraFileError(f"{where} has no '{k}' for '{p}' (nearest entries: {near})")
    used[k] = p
  quantized = [k in scan.states for k in keys]
  if any(quantized) and not all(quantized):
    k = keys[quantized.index(not quantized[0])]
    raise LoraFileError(f"{where}: '{k}' is {'quantized' if k in scan.states else 'dense'}, "
                        f"unlike '{keys[0]}' in the same stack '{p}'")
  if quantized[0]:
    return _load_quantized(files, [scan.states[k] for k in keys], p, shape, n, lead, name,
                           explicit, rules, where)
  values = [files.get(k) for k in keys]
  rest = tuple(a for a in range(len(shape)) if a not in stack_axes)
  if name.is_kernel and len(rest) >= 2:
    return jnp.asarray(_dense_kernel(values, keys, index, p, shape, n, lead, name, explicit,
                                     rules, where))
  want = tuple(shape[a] for a in rest)
  for k, v in zip(keys, values):
    if tuple(v.shape) != want:
      raise LoraFileError(f"{where}: '{k}' has shape {tuple(v.shape)}, but '{p}' {shape} "
                          f"needs {want}")
  stacked = np.stack(values).reshape(lead + want) if n else values[0]
  return jnp.asarray(to_flax(stacked, tuple(stack_axes) + rest))


def _load_quantized(files, states: list[State], p, shape, n, lead, name: Name, explicit,
                    rules: Rules, where) -> NF4Array:
  first = states[0]
  if not name.is_kernel:
    raise LoraFileError(f"{where}: '{first.key}' is quantized, but '{p}' is not a kernel (the "
                        f"rules' kernel_leaves {list(rules.kernel_leaves)})")
  for s in states[1:]:
    if not s.same_format(first):
      raise LoraFileError(f"{where}: '{s.key}' is {s.describe()}, unlike '{first.key}' "
                          f"({first.describe()}) in the same stack '{p}'")
  layout = kernel_layout(p, shape, n, first.out_in, explicit, rules, first.key, where)
  check_layout(p, layout, shape, n, where)
  parts = [quant_state.arrays(files, s) for s in states]
  stacked = {k: (np.stack([x[k] for x in parts]).reshape(lead + parts[0][k].shape) if n
                 else parts[0][k]) for k in parts[0]}
  return nf4_files.from_file({k: jnp.asarray(v) for k, v in stacked.items()}, shape, first.dtype,
                       {"quant": "nf4", "block_size": first.block_size,
                        "double_quant": first.double_quant,
                        "layout": {"in_axes": layout.in_axes, "out_axes": layout.out_axes,
                                   "stack_axes": layout.stack_axes}},
                       f"{where}: '{first.key}'", error=LoraFileError)


def _dense_kernel(values, keys, index, p, shape, n, lead, name: Name, explicit, rules: Rules,
                  where):
  out_in = []
  for k, i, v in zip(keys, index, values):
    if v.ndim != 2:
      raise LoraFileError(f"{where}: '{k}' has shape {tuple(v.shape)}, not the 2-D weight of "
                          f"a linear layer, for kernel '{p}' {shape}")
    out_in.append(v.T if rules.is_in_out(names.fill(name.template, i)) else v)
  layout = kernel_layout(p, shape, n, tuple(out_in[0].shape), explicit, rules, keys[0], where)
  check_layout(p, layout, shape, n, where)
  for k, v in zip(keys, out_in):
    if tuple(v.shape) != tuple(out_in[0].shape):
      raise LoraFileError(f"{where}: '{k}' has shape {tuple(v.shape)}, unlike '{keys[0]}' in "
                          f"the same stack '{p}'")
  dims = tuple(shape[a] for a in layout.out_axes + layout.in_axes)
  stacked = np.stack(out_in).reshape(lead + dims) if n else out_in[0].reshape(dims)
  return to_flax(stacked, layout.stack_axes + layout.out_axes + layout.in_axes)

"""``jlora.bnb.save``: Flax parameters as a bitsandbytes 4-bit checkpoint.

Each ``NF4Array`` leaf is written as bitsandbytes stores a quantized
``nn.Linear`` (its arrays as they are, the quant state as
``QuantState.as_dict(packed=True)`` writes it), every other leaf under its
PyTorch name and layout; transformers loads the file as it loads its own.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _atomic, _multihost
from jlora._paths import flatten_with_paths
from jlora.bnb.files import FORMAT, MARK, VERSION, PathLike, is_owned, one_line, sha256
from jlora.bnb.mapping import Name, check_layout, param_name
from jlora.bnb.quant_state import DTYPES, STATE, state_json
from jlora.errors import LoraFileError
from jlora.layout import Layout
from jlora.peft import axes, names
from jlora.peft.rules import Rules, RulesLike, as_rules
from jlora.quant import nf4
from jlora.quant.nf4 import NF4Array


def save(path: PathLike, params: Any, rules: RulesLike, *,
         layouts: Mapping[str, Layout] | None = None, overwrite: bool = False) -> pathlib.Path:
  """Writes Flax parameters as a Hugging Face bitsandbytes 4-bit safetensors file.

  Each ``NF4Array`` leaf is written as bitsandbytes stores a quantized
  ``nn.Linear`` (its entries listed in ``jlora.bnb``'s docstring, one module
  per slice of a stacked weight), every other leaf under its PyTorch name and
  layout (a kernel as the PyTorch ``(out, in)`` weight). Put the file in a
  folder with the model's ``config.json`` (with its ``quantization_config``)
  and transformers loads it with ``from_pretrained``. The metadata is
  transformers' (``{"format": "pt"}``) plus jlora's mark (a SHA-256 of every
  entry, checked by ``load``); the write is atomic, and ``overwrite``
  replaces only a file jlora wrote.

  Args:
    path: the file to write, ending in ``.safetensors``.
    params: the parameters, with ``NF4Array`` leaves for quantized weights.
    rules: how parameter paths name PyTorch modules (``jlora.peft.Rules``).
    layouts: path -> ``jlora.Layout`` of dense multi-axis kernels (an
      ``NF4Array`` carries its own).
    overwrite: replace an existing file jlora wrote.

  Returns:
    The absolute path written.

  Raises:
    LoraFileError: a leaf cannot be named or laid out as a PyTorch weight,
      two leaves name one entry, a quantized weight's dtype is not one
      bitsandbytes knows, or the file cannot be written.

  Example:
    See ``load``.
  """
  path = pathlib.Path(path).absolute()
  if not path.name.endswith(".safetensors"):
    raise LoraFileError(f"'{path}': a bitsandbytes checkpoint is written as a .safetensors "
                        f"file (model.safetensors in a model folder)")
  rules = as_rules(rules)
  where = f"'{path}'"
  tensors: dict[str, np.ndarray] = {}
  owner: dict[str, str] = {}

  def put(key: str, value: np.ndarray, p: str) -> None:
    if key in tensors:
      raise LoraFileError(f"{where}: '{p}' and '{owner[key]}' are both named '{key}'")
    tensors[key], owner[key] = np.ascontiguousarray(value), p

  if _multihost.process_count() > 1:
    # One file: the arrays are gathered to every process (a collective) and
    # process 0 alone writes it.
    params = _multihost.gather_to_host(params)
  pairs = [(p, leaf) for p, leaf in flatten_with_paths(params)[0] if leaf is not None]
  if not pairs:
    raise LoraFileError("params holds no arrays; nothing to save")
  for p, leaf in pairs:
    name = param_name(p, rules, where)
    n = names.n_stack(name.template)
    if isinstance(leaf, NF4Array):
      _save_quantized(put, p, leaf, name, n, where)
    else:
      _save_dense(put, p, leaf, name, n, rules, (layouts or {}).get(p), where)
  sums = {k: sha256(v) for k, v in sorted(tensors.items())}
  metadata = {"format": "pt", MARK: json.dumps({"format": FORMAT, "version": VERSION,
                                                "tensors_sha256": sums}, sort_keys=True)}

  def write(tmp: pathlib.Path) -> None:
    from safetensors.numpy import save_file
    save_file(tensors, os.fspath(tmp), metadata=metadata)

  return _atomic.replace_collective(path, write_primary=write, overwrite=overwrite,
                                    owned=is_owned, what="bitsandbytes checkpoint",
                                    op="jlora.bnb.save")


def _host(p: str, x: Any, where: str) -> np.ndarray:
  if not hasattr(x, "shape") or not hasattr(x, "dtype") or isinstance(x, jax.ShapeDtypeStruct):
    raise LoraFileError(f"{where}: '{p}': expected an array, got {type(x).__name__}")
  try:
    return np.asarray(x)
  except Exception as e:  # a tracer, an abstract value
    raise LoraFileError(f"{where}: '{p}': cannot read its values ({one_line(e)})") from None


def _save_quantized(put, p: str, q: NF4Array, name: Name, n: int, where: str) -> None:
  layout = q.layout
  check_layout(p, layout, q.shape, n, where)
  dtype = jnp.dtype(q.dtype).name
  if dtype not in DTYPES:
    raise LoraFileError(f"{where}: '{p}' is an NF4 weight of dtype {dtype}; bitsandbytes "
                        f"quant states name one of {DTYPES}")
  out_in = (math.prod(q.shape[a] for a in layout.out_axes),
            math.prod(q.shape[a] for a in layout.in_axes))
  arrays = {k: _host(f"{p}.{k}", getattr(q, k), where) for k in nf4.PARTS
            if getattr(q, k) is not None}
  lead = tuple(q.shape[a] for a in layout.stack_axes)
  for index in np.ndindex(*lead):
    key = name.key(index)
    offset = float(arrays["offset"][index]) if q.double_quant else None
    put(key, arrays["codes"][index].reshape(-1, 1), p)
    put(key + ".absmax", arrays["absmax"][index], p)
    put(key + ".quant_map", nf4.NF4_CODE.copy(), p)
    if q.double_quant:
      put(key + ".nested_absmax", arrays["nested_absmax"][index], p)
      put(key + ".nested_quant_map", nf4.DYNAMIC_CODE.copy(), p)
    put(key + STATE + "nf4", np.frombuffer(state_json(q, out_in, offset), np.uint8), p)


def _save_dense(put, p: str, leaf: Any, name: Name, n: int, rules: Rules,
                explicit: Layout | None, where: str) -> None:
  x = _host(p, leaf, where)
  shape = tuple(x.shape)
  if n > x.ndim:
    raise LoraFileError(f"{where}: '{p}' {shape} has fewer axes than the {n} stack indices of "
                        f"its module '{name.template}'")
  if name.is_kernel and x.ndim - n >= 2:
    layout = explicit
    if layout is None:
      if x.ndim - n != 2:
        raise LoraFileError(f"{where}: '{p}' {shape}: a multi-axis kernel needs its layout "
                            f"(layouts={{'{p}': jlora.Layout(...)}}) to be written as a "
                            f"PyTorch (out, in) weight")
      if rules.kernel_order is None:
        raise LoraFileError(f"{where}: '{p}' {shape}: the rules do not say whether Flax stores "
                            f"it (in, out) or (out, in); {axes.kernel_order_hint(p)}")
      flat = axes.kernel_layout(rules.kernel_order)
      layout = Layout(tuple(a + n for a in flat.in_axes), tuple(a + n for a in flat.out_axes),
                      tuple(range(n)))
    check_layout(p, layout, shape, n, where)
    order = layout.stack_axes + layout.out_axes + layout.in_axes
    lead = tuple(shape[a] for a in layout.stack_axes)
    w = np.transpose(x, order).reshape(lead + (layout.fan_out(shape), layout.fan_in(shape)))
    for index in np.ndindex(*lead):
      module = names.fill(name.template, index)
      v = w[index]
      put(name.key(index), v.T if rules.is_in_out(module) else v, p)
    return
  lead = shape[:n]
  for index in np.ndindex(*lead):
    put(name.key(index), x[index], p)

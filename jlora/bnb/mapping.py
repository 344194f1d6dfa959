"""How a Flax parameter maps to entries of a bitsandbytes checkpoint: names and layouts.

A ``jlora.peft.Rules`` names each parameter path's PyTorch module (with
``{0}``... for the indices of a stacked weight, one module per index) and
its leaf's PyTorch parameter name; ``param_name`` puts the two together. A
kernel's ``Layout`` says which of its axes are the PyTorch ``(out, in)``
weight's: ``kernel_layout`` finds it from the file's shape (or checks the
one given), ``check_layout`` holds it to what a PyTorch weight can be, and
``to_flax`` puts stacked file arrays back in the parameter's axis order.

Example:
  >>> import jlora
  >>> param_name("fc/kernel", jlora.peft.Rules(), "here").key(())
  'fc.weight'
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jlora.errors import LoraFileError, LoraSpecError
from jlora.layout import Layout
from jlora.peft import axes, names
from jlora.peft.rules import Rules


@dataclasses.dataclass(frozen=True)
class Name:
  """The PyTorch entries of one parameter: ``key(index)`` per stack index."""
  template: str          # the module, with "{0}"... for stack indices
  param: str             # the PyTorch parameter name ("weight")
  is_kernel: bool

  def key(self, index: tuple[int, ...]) -> str:
    return f"{names.fill(self.template, index)}.{self.param}"


def param_name(path: str, rules: Rules, where: str) -> Name:
  """What the rules name the parameter at ``path`` (refused if they name nothing)."""
  template = rules(path)
  if template is None:
    raise LoraFileError(f"{where}: the rules name no PyTorch module for '{path}'")
  leaf = path.rpartition("/")[2]
  param = rules.leaf_names.get(leaf)
  if param is None:
    raise LoraFileError(f"{where}: '{path}': leaf name '{leaf}' has no PyTorch name in the "
                        f"rules' leaf_names {dict(rules.leaf_names)}")
  return Name(template, param, leaf in rules.kernel_leaves)


def check_layout(path: str, layout: Layout, shape: tuple[int, ...], n_stack: int,
                 where: str) -> None:
  """Refuses a layout that does not fit ``shape``, the rules' stack indices, or
  a PyTorch weight's axis order."""
  try:
    layout.check(shape, path)
  except LoraSpecError as e:
    raise LoraFileError(f"{where}: {e}") from None
  if len(layout.stack_axes) != n_stack:
    raise LoraFileError(f"{where}: '{path}' has {len(layout.stack_axes)} stack axes in its "
                        f"layout {layout}, but the rules give its module "
                        f"{n_stack} stack indices")
  for axs in (layout.in_axes, layout.out_axes, layout.stack_axes):
    if list(axs) != sorted(axs):
      raise LoraFileError(f"{where}: '{path}': layout {layout} lists axes out of order; a "
                          f"PyTorch (out, in) weight flattens its in and out axes in the "
                          f"weight's own order")


def kernel_layout(path: str, shape: tuple[int, ...], n_stack: int, out_in: tuple[int, int],
                  explicit: Layout | None, rules: Rules, key: str, where: str) -> Layout:
  """The layout under which a PyTorch (out, in) weight is the Flax kernel."""
  out_, in_ = out_in
  if explicit is not None:
    check_layout(path, explicit, shape, n_stack, where)
    if explicit.fan_in(shape) != in_ or explicit.fan_out(shape) != out_:
      raise LoraFileError(f"{where}: '{key}' is (out, in) {out_in}, which does not fit "
                          f"'{path}' {shape} with layout {explicit}")
    return explicit
  fits = axes.splits(shape, n_stack, in_, rules.kernel_order, out_)
  if len(fits) == 1:
    return fits[0]
  if fits:
    raise LoraFileError(f"{where}: '{path}' {shape}: cannot tell whether this square kernel is "
                        f"stored (in, out) or (out, in); jlora does not guess: "
                        f"{axes.kernel_order_hint(path)}")
  raise LoraFileError(f"{where}: '{key}' is (out, in) {out_in}, which does not fit '{path}' "
                      f"{shape} (kernel_order {rules.kernel_order!r}, {n_stack} stack axes)")


def to_flax(stacked: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
  """An array whose axes are the weight's axes ``order`` -> the weight's order."""
  perm = [order.index(a) for a in range(len(order))]
  return stacked if perm == list(range(len(perm))) else np.transpose(stacked, perm)

"""Checks of a PEFT folder beyond its matched modules: its ``fan_in_fan_out``
agrees with the rules, every module its config targets has factors in the
file, and the copies of base weights PEFT saves beside an adapted embedding
are the base's own.
"""

from __future__ import annotations

import numpy as np

from jlora.errors import LoraPeftError
from jlora.peft import axes, kinds, match, names
from jlora.peft import config as peft_config
from jlora.peft.rules import Rules


def fan_in_fan_out(found, config, rules: Rules, cfg_file: str) -> None:
  """The folder's ``fan_in_fan_out`` must agree with which modules the rules
  say PyTorch stores ``(in, out)`` (``Rules.fan_in_fan_out``), which decides
  how the ``modules_to_save`` kernels and base copies are read.

  PEFT writes one flag for the whole folder and sets it from each module it
  wraps in turn (true for a Conv1D, false for an ``nn.Linear``), so with both
  kinds adapted either value is possible. What the flag does tell: ``true``
  means some adapted module is stored ``(in, out)``, ``false`` that not all
  of them are. Rules that contradict that are refused.
  """
  modules = sorted(names.fill(e.template, idx) for e, by_idx in found.values()
                   for idx, f in by_idx.items() if f.kind != kinds.PARAMETER)
  if not modules or "fan_in_fan_out" not in config:
    return
  in_out = [m for m in modules if rules.is_in_out(m)]
  stored = bool(config["fan_in_fan_out"])
  if stored and not in_out:
    said = "none of them is"
  elif not stored and len(in_out) == len(modules):
    said = "all of them are"
  else:
    return
  shown = modules[:3] + (["..."] if len(modules) > 3 else [])
  raise LoraPeftError(
      f"'{cfg_file}': fan_in_fan_out={str(stored).lower()} says PyTorch stores "
      f"{'some' if stored else 'not all'} of the adapted modules' weights (in, out) (as "
      f"Conv1D does), but the rules say {said} ({shown}; Rules.fan_in_fan_out="
      f"{rules.fan_in_fan_out!r}): the weights trained in full would be read transposed; pass "
      f"rules that agree with the folder (Rules.gpt2() for GPT-2's Conv1D modules, or "
      f"Rules.generic(fan_in_fan_out=...)), or correct the folder's flag if it is wrong")


def targets_covered(index: match.Index, found, config, weights: str) -> None:
  """Every module (and parameter) the config targets must have its factors in the file."""
  for e in index.entries:
    if e.leaf is None or e.index in found:
      continue
    module = names.first_module(e.template)
    if e.is_kernel or e.is_embedding:
      if peft_config.targets(config, module) and not peft_config.is_saved_module(config, module):
        raise LoraPeftError(
            f"'{weights}': no lora_A/lora_B for module '{module}' (parameter '{e.path}'), "
            f"which target_modules {config.get('target_modules')!r} selects; PEFT would "
            f"leave it untrained, jlora refuses")
    elif peft_config.targets_parameter(config, f"{module}.{e.param_name}"):
      raise LoraPeftError(
          f"'{weights}': no lora_A/lora_B for parameter '{module}.{e.param_name}' (parameter "
          f"'{e.path}'), which target_parameters {config.get('target_parameters')!r} "
          f"selects; PEFT would leave it untrained, jlora refuses")


def base_copies(copies, index: match.Index, rules: Rules, layouts, weights: str) -> None:
  """PEFT saves the base weights of an adapted embedding (and of the output
  head) beside the adapter (``<module>.base_layer.weight``) and loads them in
  place of the base's. They must be the base's own: anything else would be
  another model."""
  for module, (key, value) in copies.items():
    hits = [e for e, _ in index.find(module) if e.leaf is not None
            and (e.is_embedding or e.is_kernel) and not e.n_stack]
    owner = None
    if not hits:
      owner = next((m for m in rules.tied if module in rules.tied_to(m)), None)
      hits = [e for e, _ in index.find(owner or "") if e.is_embedding and e.leaf is not None]
    if len(hits) != 1:
      raise LoraPeftError(f"'{weights}': key '{key}' holds the base weights of module "
                          f"'{module}', which no parameter maps to under these rules")
    e = hits[0]
    base = np.asarray(e.leaf)
    candidates = [base]
    if e.is_kernel and base.ndim == 2:
      explicit = (layouts or {}).get(e.path)
      order = axes.layout_order(explicit) if explicit is not None else rules.kernel_order
      torch_order = "in_out" if rules.is_in_out(module) else "out_in"
      candidates = ([base, base.T] if order is None
                    else [base if order == torch_order else base.T])
    got = np.asarray(value).astype(base.dtype)
    if not any(c.shape == got.shape and np.array_equal(c, got) for c in candidates):
      raise LoraPeftError(
          f"'{weights}': key '{key}' is a copy of the base weights of '{module}' (PEFT saves "
          f"embedding layers with an adapter and loads them in place of the base's), and it "
          f"differs from '{e.path}' in params; pass the base this adapter was saved with")

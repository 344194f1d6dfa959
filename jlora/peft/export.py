"""Export: a jlora adapter as a PEFT LoRA adapter folder (``jlora.peft.save``)."""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import re
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jlora import _atomic, _multihost
from jlora.errors import LoraLayoutError, LoraPeftError, LoraTreeError
from jlora._paths import flatten_with_paths
from jlora.adapters.adapter import is_adapter
from jlora.adapters.bank import LoraBank
from jlora.adapters.dora import DoraParam
from jlora.adapters.inits import relative_to_original
from jlora.spec import LoraSpec
from jlora.peft import config as peft_config
from jlora.peft import mark, names
from jlora.layout import Layout
from jlora.peft import axes, fused, kinds
from jlora.peft.rules import Rules, RulesLike, as_rules


def _clean_number(x: float) -> int | float:
  """An alpha recovered from a float scale: 7.999999999 -> 8."""
  nearest = round(x)
  if abs(x - nearest) <= 1e-6 * max(1.0, abs(x)):
    return int(nearest)
  return float(x)


def _is_lora_param(x: Any) -> bool:
  return is_adapter(x)


def _plain(pairs: list[tuple[str, Any]], treedef: Any, initial: Any
           ) -> list[tuple[str, Any]]:
  """The leaves to write: adapters relative to a residual base (PiSSA, OLoRA)
  are converted to plain ones of the original weights with ``initial``, or
  refused."""
  marked = [(p, leaf) for p, leaf in pairs if getattr(leaf, "residual", None) is not None]
  if not marked:
    return pairs
  if initial is None:
    path, leaf = marked[0]
    raise LoraPeftError(
        f"'{path}' was made with init={leaf.residual!r}: it is relative to the residual W0 "
        f"that lora_transform returned in frozen, not to the original weights a PEFT user "
        f"loads it onto. Pass initial=<the trainable tree lora_transform returned> to write "
        f"it as PEFT's conversion to a plain adapter of rank 2r "
        f"(path_initial_model_for_weight_conversion)")
  try:
    plain = relative_to_original(treedef.unflatten([leaf for _, leaf in pairs]), initial)
  except LoraTreeError as e:
    raise LoraPeftError(f"cannot write an adapter of the original weights: {e}") from None
  return flatten_with_paths(plain, is_leaf=is_adapter)[0]


def _module_kind(rules: Rules, path: str, template: str) -> str:
  """What PyTorch module (or parameter) a weight is: see ``jlora.peft.kinds``."""
  leaf = path.rpartition("/")[2]
  first = names.first_module(template)
  if leaf in rules.embedding_leaves:
    return kinds.EMBEDDING
  if leaf in rules.kernel_leaves:
    return kinds.CONV if rules.is_conv(first) else kinds.LINEAR
  if rules.is_parameter(f"{first}.{rules.torch_param(path)}"):
    return kinds.PARAMETER
  return kinds.LINEAR


def _tied_modules(rules: Rules, path: str, module_template: str, kind: str,
                  dora: bool) -> tuple[str, ...]:
  """The modules tied to an adapted embedding, which PEFT must adapt alike."""
  module = names.first_module(module_template)
  tied = rules.tied_to(module)
  if not tied:
    return ()
  if module.rpartition(".")[2] != "embed_tokens":
    raise LoraPeftError(
        f"'{path}': the table of '{module}' is tied to {list(tied)}, and jlora adapts it in "
        f"every use; PEFT 0.21 adapts tied modules alike (ensure_weight_tying) only for an "
        f"embedding named 'embed_tokens', and would adapt the lookup of '{module}' alone. "
        f"Leave the embedding out of the targets")
  if dora:
    raise LoraPeftError(
        f"'{path}': DoRA on a tied table: PEFT keeps one magnitude per embedding dimension "
        f"on '{module}' and one per token on {list(tied)}, which one table cannot hold")
  return tied


def _depth(rules: Rules, path: str, module_template: str, paths: list[str]) -> int:
  """How deep PEFT nests the wrapper of an adapted parameter: the parameters
  of one module are wrapped in the order PyTorch registers them, the first
  innermost."""
  if len(paths) == 1:
    return 0
  params = [rules.torch_param(p) for p in paths]
  unknown = [p for p in params if p not in rules.parameter_order]
  if unknown:
    raise LoraPeftError(
        f"'{path}': {len(paths)} parameters of PyTorch module '{module_template}' are adapted "
        f"({params}); PEFT names their factors by the order the module registers them, which "
        f"the rules do not give for {unknown}: pass Rules(parameter_order=[...]) in the "
        f"order of the module's __init__")
  order = sorted(params, key=rules.parameter_order.index)
  return len(order) - 1 - order.index(rules.torch_param(path))


def _module_template(rules: Rules, path: str, what: str) -> str:
  template = rules(path)
  if template is None:
    raise LoraPeftError(f"'{path}': the rules give no PyTorch module name for this {what}; "
                        f"add a pattern to jlora.peft.Rules (or return a name from your "
                        f"rule function)")
  if not isinstance(template, str) or not template:
    raise LoraPeftError(f"'{path}': the rules returned {template!r}, not a module name")
  return template


def _claim(owners: dict[str, str], module: str, path: str) -> None:
  prev = owners.setdefault(module, path)
  if prev != path:
    raise LoraPeftError(f"'{path}' and '{prev}' both map to PyTorch module '{module}'; "
                        f"the rules must give each parameter its own module")


def _flax_order(path: str, rules: Rules, spec: LoraSpec | None,
                layouts: Mapping[str, Layout] | None) -> str:
  """How the Flax side stores a 2-D kernel: its layout if given, else the
  rules' kernel_order; refused when neither says."""
  layout = (layouts or {}).get(path)
  if layout is None and spec is not None:
    layout = spec.layout_override(path)
  order = axes.layout_order(layout) if layout is not None else rules.kernel_order
  if order is None:
    raise LoraLayoutError(f"'{path}' is trained in full, and nothing says whether it is "
                          f"stored (in, out) or (out, in): PyTorch needs to know; "
                          f"{axes.kernel_order_hint(path)}")
  return order


def _to_numpy(x: Any, dtype: Any) -> np.ndarray:
  arr = np.asarray(jax.device_get(x))
  return arr.astype(dtype) if dtype is not None else arr


def _warn_servers(config: Mapping[str, Any]) -> None:
  """PEFT loads these options; vLLM's LoRA loader (PEFTHelper) refuses them."""
  refused = [f"{k}={config[k]!r}" for k in ("use_dora", "modules_to_save") if config.get(k)]
  if refused:
    warnings.warn(f"jlora.peft.save: the adapter has {', '.join(refused)}, which PyTorch PEFT "
                  f"loads but vLLM does not serve (its LoRA loader refuses DoRA and "
                  f"modules_to_save); for vLLM, train without them", UserWarning, stacklevel=3)


def save(path: str | os.PathLike, trainable: Any, rules: RulesLike, *,
         spec: LoraSpec | None = None, use_rslora: bool | None = None,
         base_model_name_or_path: str | None = None,
         target_modules: Sequence[str] | str | None = None,
         task_type: str | None = None, dtype: Any = None,
         extra_config: Mapping[str, Any] | None = None,
         layouts: Mapping[str, Layout] | None = None,
         initial: Any = None,
         overwrite: bool = False) -> dict[str, Any]:
  """Writes ``trainable``'s adapters as a PEFT LoRA adapter folder.

  Writes ``adapter_config.json`` and ``adapter_model.safetensors`` as
  ``PeftModel.save_pretrained`` does (plus jlora's checksums in the
  safetensors metadata, which ``jlora.peft.load`` verifies), so that
  ``PeftModel.from_pretrained(torch_base_model, path)`` (and readers of the
  format such as vLLM) load it. Each adapted weight becomes
  ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight``
  ``(out, r)``: the transposes of jlora's ``a (in, r)`` and ``b (r, out)``, with
  multi-axis in/out axes flattened in the weight's axis order and each
  index of a stack axis (``nn.scan`` layers) written as its own module.
  ``DoraParam`` adapters are written with ``use_dora=true`` and their
  ``lora_magnitude_vector``; embedding tables, convolutions (``Rules.conv``)
  and bare parameters such as fused experts (``Rules.parameters``, PEFT's
  ``target_parameters``) in PEFT's layout for each (``jlora.peft.kinds``); a
  tied table (``Rules.tied``) with ``ensure_weight_tying``; a fused kernel
  (Gemma's ``kv_einsum``, named ``...k_proj+v_proj`` by the rules) as each of
  its modules, with the kernel's ``lora_A`` and its own block of ``lora_B``.
  DoRA and ``modules_to_save``, which vLLM refuses, are written with a
  ``UserWarning`` that says so.
  Plain arrays in ``trainable`` (``LoraSpec.extra_trainable``) are written
  as PEFT ``modules_to_save`` under their PyTorch names, which requires
  every parameter of their module to be trained in full.

  The folder is written atomically: staged beside ``path`` and swapped in,
  so a reader finds the old folder or the new one, never a config of one
  with the tensors of the other, even if the process is killed.

  With several JAX processes (``jax.distributed``), every process must call
  ``save`` (the factors are gathered from all of them, a collective): each
  builds the same config, process 0 alone writes the folder, and the others
  wait until it is in place and return the same config, or raise process
  0's error. A process that calls it alone waits at most
  ``jlora._multihost.TIMEOUT_S`` (600 s; ``JLORA_MULTIHOST_TIMEOUT_S``) for
  the others, then raises.

  ``lora_alpha`` is recovered from each ``LoraParam.scale``: ``scale * r``,
  or ``scale * sqrt(r)`` with rsLoRA. Whether rsLoRA was used is not stored
  in a ``LoraParam``; it comes from ``use_rslora``, else ``spec.use_rslora``,
  else ``False``. Either way PEFT computes the same scale; the flag only
  decides which alpha the file records. ``r``/``lora_alpha`` are the most
  common values; modules that differ go to ``rank_pattern``/``alpha_pattern``
  keyed by their escaped full module name, anchored (``^transformer\\.h\\.0...``)
  so that PEFT applies each key to that module only.

  Args:
    path: the folder to write (created; an existing empty folder is used).
    trainable: the trainable tree from ``jlora.lora_transform`` (or
      ``jlora.peft.load``), possibly trained.
    rules: how parameter paths name PyTorch modules: a ``jlora.peft.Rules``
      or a function (see ``Rules``).
    spec: the ``LoraSpec`` the adapters were made with; supplies
      ``use_rslora`` and exact alphas, and is checked against each scale.
    use_rslora: overrides ``spec.use_rslora``.
    base_model_name_or_path: recorded in the config (a Hub id or folder).
    target_modules: the config's ``target_modules``. By default the distinct
      last names of the adapted modules (``["c_attn", "c_fc"]``), or the full
      module names when short names would also select a module left without
      LoRA. A value given here must select exactly the adapted modules.
    task_type: PEFT's ``task_type`` (``"CAUSAL_LM"``...), recorded as is.
    dtype: cast the tensors to this dtype (default: as stored).
    extra_config: more keys for ``adapter_config.json`` (written last).
    layouts: path -> Layout of kernels trained in full whose storage the
      rules' ``kernel_order`` does not give (``jlora.infer_layouts``).
    initial: for adapters made by PiSSA or OLoRA (relative to the residual
      base in ``frozen``), the trainable tree ``lora_transform`` returned:
      they are written as plain adapters of the original weights with rank
      ``2r`` (``jlora.relative_to_original``), as PEFT's
      ``path_initial_model_for_weight_conversion`` does. Without it such
      adapters are refused: PEFT would apply them to the original weights.
    overwrite: replace an existing folder at ``path`` (one jlora wrote).

  Returns:
    The config written to ``adapter_config.json``.

  Raises:
    LoraPeftError: a parameter has no module name, two map to one module,
      the stack axes and the rules disagree, the tree holds something
      PEFT's format cannot express (a bank, DoRA mixed with LoRA, DoRA on
      target_parameters, an adapter of a residual base without ``initial``), ``path`` exists (without ``overwrite``,
      or is not a folder jlora wrote), or the file system refused.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile
    >>> params = {"fc": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    >>> spec = jlora.LoraSpec(rank=2, alpha=4, targets=["fc/kernel"])
    >>> frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> config = jlora.peft.save(tempfile.mkdtemp(), trainable, jlora.peft.Rules(), spec=spec)
    >>> config["r"], config["lora_alpha"], config["target_modules"]
    (2, 4, ['fc'])
  """
  directory = os.fspath(path)
  rules = as_rules(rules)
  sync = _multihost.Op("jlora.peft.save")
  if sync.multiprocess:
    # Every process calls save; the factors are gathered to every host (a
    # collective), every process builds the same tensors and config (so a
    # refusal is raised everywhere alike), and process 0 alone writes.
    sync.barrier("start", LoraPeftError)
    trainable = _multihost.gather_to_host(trainable)
    if initial is not None:
      initial = _multihost.gather_to_host(initial)
  pairs, treedef = flatten_with_paths(trainable, is_leaf=is_adapter)
  pairs = _plain(pairs, treedef, initial)
  if use_rslora is None:
    use_rslora = bool(spec.use_rslora) if spec is not None else False
  tensors: dict[str, np.ndarray] = {}
  owners: dict[str, str] = {}
  # module (or, for target_parameters, parameter) name -> (rank, alpha)
  lora_modules: dict[str, tuple[int, int | float]] = {}
  parameters: list[str] = []
  lora_templates: set[str] = set()
  dropouts: list[float] = []
  kinds_seen: set[type] = set()
  tied_any = False
  # Several adapted parameters of one module: PEFT nests a wrapper per parameter.
  by_module: dict[str, list[str]] = collections.defaultdict(list)
  for path, leaf in pairs:
    if _is_lora_param(leaf):
      template = rules(path)
      if template and _module_kind(rules, path, template) == kinds.PARAMETER:
        by_module[template].append(path)

  for path, leaf in pairs:
    if not is_adapter(leaf):
      continue
    if isinstance(leaf, LoraBank):
      raise LoraPeftError(f"'{path}' is a bank of adapters; write it with "
                          f"jlora.peft.save_bank (a subfolder per adapter)")
    kinds_seen.add(type(leaf))
    template = _module_template(rules, path, "adapted weight")
    kind = _module_kind(rules, path, template)
    layout, r = leaf.layout, leaf.rank
    n_modules = names.n_stack(template)
    if n_modules > len(layout.stack_axes) or (
        kind != kinds.PARAMETER and n_modules != len(layout.stack_axes)):
      hint = (" (fused experts are PEFT target_parameters: select them with "
              "Rules(parameters=...))" if kind == kinds.LINEAR and layout.stack_axes else "")
      raise LoraPeftError(
          f"'{path}': the rules name it '{template}' with {n_modules} stack-index "
          f"field(s), but its layout {layout} has {len(layout.stack_axes)} stack axes (one "
          f"PyTorch module per index, e.g. '{{layer}}' in a Rules pattern){hint}")
    lay = kinds.slice_layout(layout, n_modules)
    kinds.check_slice(kind, path, lay)
    root = math.sqrt(r) if use_rslora else r
    alpha = _clean_number(leaf.scale * root)
    if spec is not None:
      want = spec.scale_for(path)
      if not math.isclose(want, leaf.scale, rel_tol=1e-6):
        raise LoraPeftError(
            f"'{path}': its scale {leaf.scale} is not the spec's {want} (rank "
            f"{spec.rank_for(path)}, alpha {spec.alpha_for(path)}, use_rslora "
            f"{spec.use_rslora}); pass the LoraSpec these adapters were made with")
      if spec.use_rslora == use_rslora and spec.rank_for(path) == r:
        alpha = _clean_number(spec.alpha_for(path))
    dora = isinstance(leaf, DoraParam)
    tied = _tied_modules(rules, path, template, kind, dora) if kind == kinds.EMBEDDING else ()
    if kind == kinds.PARAMETER:
      if dora:
        raise LoraPeftError(f"'{path}': PEFT has no DoRA for target_parameters (its "
                            f"ParamWrapper refuses use_dora)")
      if leaf.dropout:
        raise LoraPeftError(f"'{path}': PEFT's target_parameters cannot apply LoRA dropout "
                            f"(its ParamWrapper refuses lora_dropout != 0); this adapter has "
                            f"dropout {leaf.dropout}")
    a, b = _to_numpy(leaf.a, dtype), _to_numpy(leaf.b, dtype)
    m = _to_numpy(leaf.magnitude, dtype) if dora else None
    for idx in np.ndindex(*a.shape[:n_modules]):
      module = template.format(*idx)
      if kind == kinds.PARAMETER:
        pname = f"{module}.{rules.torch_param(path)}"
        transposed = rules.is_transposed(pname)
        key_module = names.nested(module, _depth(rules, path, template, by_module[template]))
        _claim(owners, pname, path)
        lora_a, lora_b = kinds.to_torch(kind, a[idx], b[idx], lay, transposed)
        tensors[names.lora_key(key_module, "A")] = lora_a
        tensors[names.lora_key(key_module, "B")] = lora_b
        lora_modules[pname] = (r, alpha)
        parameters.append(pname)
        continue
      lora_a, lora_b = kinds.to_torch(kind, a[idx], b[idx], lay)
      # A fused kernel (Gemma's kv_einsum) is several modules, one block of B each.
      parts = fused.split(path, module, kind, dora, lay, b[idx].shape, lora_b)
      for part, _ in parts:
        _claim(owners, part, path)
      if kind == kinds.EMBEDDING:
        tensors[names.embedding_key(module, "A")] = lora_a
        tensors[names.embedding_key(module, "B")] = lora_b
        for other in tied:   # PEFT's tied Linear: A = B_emb^T, B = A_emb^T
          _claim(owners, other, path)
          tensors[names.lora_key(other, "A")] = np.ascontiguousarray(lora_b.T)
          tensors[names.lora_key(other, "B")] = np.ascontiguousarray(lora_a.T)
          tied_any = True
      else:
        for part, part_b in parts:
          tensors[names.lora_key(part, "A")] = lora_a
          tensors[names.lora_key(part, "B")] = part_b
      if dora:
        tensors[names.magnitude_key(module)] = kinds.magnitude_to_torch(kind, m[idx], lay, path)
      for part, _ in parts:
        lora_modules[part] = (r, alpha)
    lora_templates.add(template)
    dropouts.append(float(leaf.dropout))
  if not lora_modules:
    raise LoraPeftError("trainable holds no jlora adapter (LoraParam, DoraParam): nothing "
                        "to export")
  if len(kinds_seen) > 1:
    raise LoraPeftError(
        f"trainable mixes {sorted(k.__name__ for k in kinds_seen)}; PEFT's use_dora is one "
        f"flag for a whole adapter folder: save the DoRA and the LoRA weights as two folders")
  use_dora = DoraParam in kinds_seen
  if parameters and any(rules.is_in_out(m) for m in lora_modules if m not in parameters):
    raise LoraPeftError("PEFT's target_parameters cannot be combined with fan_in_fan_out "
                        "modules (GPT-2's Conv1D) in one folder")

  # Weights trained in full -> modules_to_save, whole modules only.
  by_template: dict[str, list[tuple[str, Any]]] = collections.defaultdict(list)
  for path, leaf in pairs:
    template = rules(path)
    if template is not None:
      by_template[template].append((path, leaf))
  saved: list[str] = []
  for path, leaf in pairs:
    if leaf is None or _is_lora_param(leaf):
      continue
    template = _module_template(rules, path, "weight trained in full")
    for other, other_leaf in by_template[template]:
      if other_leaf is None or _is_lora_param(other_leaf):
        raise LoraPeftError(
            f"'{path}' is trained in full but '{other}' of the same PyTorch module "
            f"'{template}' is {'adapted' if other_leaf is not None else 'frozen'}; "
            f"PEFT's modules_to_save trains whole modules (its bias='all'/'lora_only' "
            f"options are not exported)")
    leaf_name = path.rpartition("/")[2]
    torch_name = rules.leaf_names.get(leaf_name)
    if torch_name is None:
      raise LoraPeftError(f"'{path}': no PyTorch parameter name for leaf '{leaf_name}'; "
                          f"add it to Rules.leaf_names")
    arr = _to_numpy(leaf, dtype)
    k = names.n_stack(template)
    if arr.ndim < k:
      raise LoraPeftError(f"'{path}': shape {arr.shape} has fewer axes than the "
                          f"{k} stack indices of '{template}'")
    for idx in np.ndindex(*arr.shape[:k]):
      module = template.format(*idx)
      _claim(owners, f"{module}.{torch_name}", path)
      w = arr[idx]
      if leaf_name in rules.kernel_leaves:
        if w.ndim != 2:
          raise LoraPeftError(f"'{path}': a {w.ndim}-D kernel trained in full has no "
                              f"PyTorch layout; only 2-D kernels are exported")
        torch_order = "in_out" if rules.is_in_out(module) else "out_in"
        if _flax_order(path, rules, spec, layouts) != torch_order:
          w = w.T
      tensors[names.full_key(module, torch_name)] = np.ascontiguousarray(w)
      if module not in saved:
        saved.append(module)
  for module in saved:
    for lora in lora_modules:
      if lora.startswith(module + "."):
        raise LoraPeftError(f"PyTorch module '{lora}' is adapted but lies inside "
                            f"'{module}', which is trained in full (modules_to_save)")

  r_global = collections.Counter(r for r, _ in lora_modules.values()).most_common(1)[0][0]
  alpha_global = collections.Counter(a for _, a in lora_modules.values()).most_common(1)[0][0]
  # Each key is anchored to its own module: PEFT matches a key against every
  # '.'-aligned suffix of a module name, so 'fc' alone would also pick 'block.fc'.
  rank_pattern = {"^" + re.escape(m): r for m, (r, _) in lora_modules.items() if r != r_global}
  alpha_pattern = {"^" + re.escape(m): a for m, (_, a) in lora_modules.items()
                   if a != alpha_global}

  # Modules the Flax tree knows of that PEFT could adapt but jlora did not.
  saved_templates = {rules(p) for p, leaf in pairs if leaf is not None and not _is_lora_param(leaf)}
  others = sorted({t for p, leaf in pairs
                   if p.rpartition("/")[2] in rules.kernel_leaves + rules.embedding_leaves
                   and not _is_lora_param(leaf)
                   and (t := rules(p)) is not None and t not in lora_templates
                   and t not in saved_templates})
  others = sorted({part for t in others for part in names.fused_parts(t)})
  modules_only = [m for m in lora_modules if m not in parameters]
  if target_modules is None:
    short = sorted({m.rpartition(".")[2] for m in modules_only})
    if any(not s or s.isdigit() for s in short) or any(
        t.rpartition(".")[2] in short for t in others):
      target_modules = modules_only
    else:
      target_modules = short
  else:
    target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
    probe = {"target_modules": target_modules, "modules_to_save": saved or None}
    for m in modules_only:
      if peft_config.targets(probe, m) is False:
        raise LoraPeftError(f"target_modules {target_modules!r} does not select adapted "
                            f"module '{m}'; PEFT would ignore its weights")
    for t in others:
      m = names.first_module(t)
      if peft_config.targets(probe, m):
        raise LoraPeftError(f"target_modules {target_modules!r} selects '{m}', which has "
                            f"no LoRA factors; PEFT would add an untrained adapter there")

  config: dict[str, Any] = {
      "alpha_pattern": alpha_pattern,
      "auto_mapping": None,
      "base_model_name_or_path": base_model_name_or_path,
      "bias": "none",
      "fan_in_fan_out": any(rules.is_in_out(m) for m in modules_only),
      "inference_mode": True,
      "init_lora_weights": True,
      "layer_replication": None,
      "layers_pattern": None,
      "layers_to_transform": None,
      "loftq_config": {},
      "lora_alpha": alpha_global,
      "lora_dropout": collections.Counter(dropouts).most_common(1)[0][0],
      "megatron_config": None,
      "megatron_core": "megatron.core",
      "modules_to_save": saved or None,
      "peft_type": "LORA",
      "r": r_global,
      "rank_pattern": rank_pattern,
      "revision": None,
      "target_modules": target_modules,
      "task_type": task_type,
      "use_dora": use_dora,
      "use_rslora": bool(use_rslora),
  }
  if parameters:
    config["target_parameters"] = sorted(parameters)
  if tied_any:
    config["ensure_weight_tying"] = True
  config.update(extra_config or {})
  peft_config.check(config, "jlora.peft.save config")
  _warn_servers(config)

  from safetensors.numpy import save_file
  st_metadata = mark.metadata(config, tensors)

  def write(folder: pathlib.Path) -> None:
    folder.mkdir()
    with open(folder / names.CONFIG_NAME, "w") as f:
      f.write(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, os.fspath(folder / names.WEIGHTS_NAME), metadata=st_metadata)

  _atomic.replace_collective(directory, write_primary=write, overwrite=overwrite,
                             owned=mark.is_owned, what="PEFT folder", error=LoraPeftError,
                             op="jlora.peft.save")
  return config


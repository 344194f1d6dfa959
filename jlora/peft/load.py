"""Import: a PEFT LoRA adapter folder as jlora factors (``jlora.peft.load``).

Only JSON and safetensors are read (``safetensors.numpy``): no torch, no
pickle, no code from the folder runs. Every option, key, shape and rank is
checked before anything is returned; no factor is ever left at an initial
value.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import os
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _atomic
from jlora.errors import LoraLayoutError, LoraPeftError, LoraSpecError
from jlora._paths import flatten_with_paths
from jlora.layout import Layout
from jlora.dora import DoraParam
from jlora.lora_param import LoraParam
from jlora.spec import LoraSpec
from jlora.transform import resolve_layout
from jlora.peft import config as peft_config
from jlora.peft import mark, names
from jlora.peft import axes, kinds
from jlora.peft.rules import Rules, RulesLike, as_rules

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


@dataclasses.dataclass
class _Entry:
  index: int            # position among the flattened leaves
  path: str
  leaf: Any
  template: str
  n_stack: int
  torch_name: str | None
  is_kernel: bool
  is_embedding: bool = False
  param_name: str = ""   # the PyTorch parameter name (for target_parameters)


def _read_folder(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  path = os.fspath(_atomic.resolve(path))
  if not os.path.isdir(path):
    raise LoraPeftError(f"'{path}' is not a folder (expected a PEFT adapter folder with "
                        f"{names.CONFIG_NAME} and {names.WEIGHTS_NAME})")
  cfg_file = os.path.join(path, names.CONFIG_NAME)
  if not os.path.isfile(cfg_file):
    raise LoraPeftError(f"'{path}' has no {names.CONFIG_NAME}")
  config = peft_config.read(cfg_file)
  peft_config.check(config, cfg_file)
  weights = os.path.join(path, names.WEIGHTS_NAME)
  if not os.path.isfile(weights):
    if os.path.isfile(os.path.join(path, names.PICKLE_NAME)):
      raise LoraPeftError(
          f"'{path}' holds {names.PICKLE_NAME}, a pickle, which jlora never reads (it can "
          f"run code). Re-save it in PEFT with safe_serialization=True")
    raise LoraPeftError(f"'{path}' has no {names.WEIGHTS_NAME}")
  from safetensors import safe_open
  try:
    with safe_open(weights, "numpy") as f:
      meta = f.metadata()
      tensors = {key: f.get_tensor(key) for key in f.keys()}
  except Exception as e:  # safetensors raises its own error types
    raise LoraPeftError(f"'{weights}' is not a readable safetensors file: "
                        f"{' '.join(str(e).split())}") from None
  mark.check(config, tensors, meta, path)
  return config, tensors


def _parse_keys(tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], weights: str):
  """The file's tensors by role: adapter parts by module name (``A``/``B``,
  ``embA``/``embB``, ``m``), ``modules_to_save`` weights, and the copies of
  base weights PEFT saves with an adapted embedding (``<module>.base_layer.weight``)."""
  lora: dict[str, dict[str, tuple[str, np.ndarray]]] = collections.defaultdict(dict)
  full: dict[tuple[str, str], tuple[str, np.ndarray]] = {}
  copies: dict[str, tuple[str, np.ndarray]] = {}
  for key, value in tensors.items():
    rest = names.strip_prefix(key)
    if rest is None:
      raise LoraPeftError(
          f"'{weights}': key '{key}' lacks the '{names.KEY_PREFIX}' prefix PEFT writes; PEFT "
          f"would load such a file with every factor left at its initial value")
    parsed = names.parse_adapter_key(rest)
    if parsed:
      module, part = parsed
      if part == "m" and not config.get("use_dora"):
        raise LoraPeftError(f"'{weights}': key '{key}' is a DoRA magnitude, but "
                            f"adapter_config.json has use_dora=false; the folder is "
                            f"inconsistent")
      lora[module][part] = (key, value)
      continue
    if rest.endswith(names.BASE_LAYER + ".weight"):
      copies[rest[:-len(names.BASE_LAYER + ".weight")]] = (key, value)
      continue
    kind = names.key_kind(rest)
    if kind == "lora_bias":
      raise LoraPeftError(f"'{weights}': key '{key}' is a LoRA bias (lora_bias=True), "
                          f"which jlora does not support")
    if kind != "full":
      raise LoraPeftError(f"'{weights}': key '{key}' is not a LoRA tensor jlora knows")
    module, _, param = rest.rpartition(".")
    if not module or not peft_config.is_saved_module(config, module):
      raise LoraPeftError(
          f"'{weights}': unexpected key '{key}': not a lora_A/lora_B weight and not in "
          f"modules_to_save {config.get('modules_to_save')!r}")
    full[(module, param)] = (key, value)
  return lora, full, copies


class _Index:
  """Parameter paths by PyTorch module name, from the forward rule."""

  def __init__(self, pairs, rules: Rules):
    self.entries: list[_Entry] = []
    self.exact: dict[str, list[_Entry]] = collections.defaultdict(list)
    self.stacked: list[tuple[re.Pattern, list[int], _Entry]] = []
    for i, (path, leaf) in enumerate(pairs):
      template = rules(path)
      if template is None:
        continue
      leaf_name = path.rpartition("/")[2]
      e = _Entry(i, path, leaf, template, names.n_stack(template),
                 rules.leaf_names.get(leaf_name), leaf_name in rules.kernel_leaves,
                 leaf_name in rules.embedding_leaves, rules.torch_param(path))
      self.entries.append(e)
      if e.n_stack:
        regex, positions = names.template_regex(template)
        self.stacked.append((regex, positions, e))
      else:
        self.exact[template].append(e)

  def find(self, module: str) -> list[tuple[_Entry, tuple[int, ...]]]:
    out = [(e, ()) for e in self.exact.get(module, ())]
    for regex, positions, e in self.stacked:
      m = regex.fullmatch(module)
      if m:
        index = [0] * e.n_stack
        for pos, g in zip(positions, m.groups()):
          index[pos] = int(g)
        out.append((e, tuple(index)))
    return out

  def near(self, module: str) -> list[str]:
    known = list(self.exact) + [e.template for _, _, e in self.stacked]
    return difflib.get_close_matches(module, known, n=3, cutoff=0.0)


def _anchored(values: Mapping[str, Any]) -> dict[str, Any]:
  """path -> value as LoraSpec patterns that match that path only: a pattern
  also matches '/'-aligned suffixes, so 'fc/kernel' alone would pick
  'block/fc/kernel' too."""
  return {"^" + re.escape(p): v for p, v in sorted(values.items())}


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
      ``nn.scan`` stacks and multi-axis kernels.
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
  config, tensors = _read_folder(directory)
  weights = os.path.join(directory, names.WEIGHTS_NAME)
  lora, full, copies = _parse_keys(tensors, config, weights)
  if not lora:
    raise LoraPeftError(f"'{weights}' holds no lora_A/lora_B tensors")
  pairs, treedef = flatten_with_paths(params)
  index = _Index(pairs, rules)

  found = _match_lora_modules(lora, index, config, rules, weights)
  factors = {i: _assemble_factors(entry, by_idx, layouts, rules, weights)
             for i, (entry, by_idx) in found.items()}
  _check_targets_covered(index, found, config, weights)
  _check_copies(copies, index, rules, layouts, weights)
  extras = _load_full_weights(full, index, found, config, rules, weights, layouts)

  factor_dtype = _factor_dtype(factors, dtype, {pairs[i][0]: i for i in factors}, found, weights)
  spec = _spec_of(config, {pairs[i][0]: f for i, f in factors.items()},
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
  return Adapter(treedef.unflatten(frozen), treedef.unflatten(trainable), spec,
                     dict(config))


def _factor_dtype(factors, dtype, index_of, found, weights: str) -> np.dtype:
  """One dtype for every factor: the file's, promoted so that no value changes
  (a float16 lora_A with a float32 lora_B gives float32), or ``dtype``, if no
  finite value becomes infinite in it."""
  stored = [x.dtype for _, a, b, _, _, m in factors.values() for x in (a, b, m)
            if x is not None]
  if dtype is None:
    return jnp.dtype(jnp.result_type(*stored))
  want = jnp.dtype(dtype)
  for path, i in index_of.items():
    _, a, b, _, _, m = factors[i]
    for name, x in (("lora_A", a), ("lora_B", b), ("lora_magnitude_vector", m)):
      if x is None:
        continue
      with np.errstate(over="ignore"):
        cast = np.asarray(x).astype(want)
      if np.any(np.isfinite(x) & ~np.isfinite(cast)):
        first = next(iter(found[i][1].values()))
        key = {"lora_A": first.key_a, "lora_B": first.key_b}.get(name, first.key_m)
        raise LoraPeftError(f"'{weights}': '{key}' does not fit in {want.name} (values up to "
                            f"{float(np.max(np.abs(x))):.4g} would become infinite); load it "
                            f"in a wider dtype (dtype=None keeps the file's)")
  return want


@dataclasses.dataclass
class _Found:
  """One module's (one slice's) tensors in the file."""
  kind: str
  key_a: str
  lora_a: np.ndarray
  key_b: str
  lora_b: np.ndarray
  r: int
  alpha: Any
  magnitude: np.ndarray | None = None
  key_m: str | None = None
  transposed: bool = False


def _halves(parts, name: str, emb: bool, weights: str):
  keys = ("embA", "embB") if emb else ("A", "B")
  key_of = ((lambda h: names.embedding_key(name, h)) if emb
            else (lambda h: names.lora_key(name, h)))
  for half, other in ((keys[0], keys[1]), (keys[1], keys[0])):
    if half not in parts:
      raise LoraPeftError(f"'{weights}': '{parts[other][0]}' has no partner "
                          f"'{key_of(half[-1])}'")
  return parts[keys[0]], parts[keys[1]]


def _check_pair(kind: str, key_a: str, lora_a, key_b: str, lora_b, weights: str) -> None:
  ok = lora_b.ndim >= 2 and lora_b.shape[1] == lora_a.shape[0]
  if kind == kinds.CONV:
    ok = ok and lora_a.ndim == lora_b.ndim and all(d == 1 for d in lora_b.shape[2:])
    want = "(r, in, *window) and (out, r, 1, ...)"
  else:
    ok = ok and lora_a.ndim == 2 and lora_b.ndim == 2
    want = "(r, in) and (out, r)" if kind != kinds.EMBEDDING else "(r, vocab) and (d, r)"
  if not ok:
    raise LoraPeftError(f"'{weights}': '{key_a}' {lora_a.shape} and '{key_b}' "
                        f"{lora_b.shape} are not {want}")


def _match_lora_modules(lora, index: _Index, config, rules: Rules, weights: str
                        ) -> dict[int, tuple[_Entry, dict[tuple[int, ...], _Found]]]:
  """Each file module -> the weight it adapts (leaf index) and stack index."""
  found: dict[int, tuple[_Entry, dict[tuple[int, ...], _Found]]] = {}
  by_param_module: dict[str, dict[int, tuple[str, Any]]] = collections.defaultdict(dict)
  tied: dict[str, Any] = {}
  embeddings: dict[str, Any] = {}
  use_dora = bool(config.get("use_dora"))

  def record(e: _Entry, idx, kind: str, pattern_name: str, a_part, b_part, parts,
             transposed: bool = False) -> None:
    (key_a, lora_a), (key_b, lora_b) = a_part, b_part
    _check_pair(kind, key_a, lora_a, key_b, lora_b, weights)
    slice_shape = tuple(e.leaf.shape)[e.n_stack:]
    r = kinds.rank_of(kind, lora_a, slice_shape) if kind == kinds.PARAMETER else lora_a.shape[0]
    want_r = peft_config.pattern_value(config.get("rank_pattern"), pattern_name, config["r"])
    if r != want_r:
      raise LoraPeftError(f"'{weights}': '{key_a}' has rank {r} but adapter_config.json "
                          f"gives module '{pattern_name}' rank {want_r}")
    alpha = peft_config.pattern_value(config.get("alpha_pattern"), pattern_name,
                                      config["lora_alpha"])
    m_part = parts.get("m")
    if use_dora and kind != kinds.PARAMETER and m_part is None:
      raise LoraPeftError(f"'{weights}': no '{names.magnitude_key(pattern_name)}' for "
                          f"module '{pattern_name}', although use_dora is true")
    if m_part is not None and kind == kinds.PARAMETER:
      raise LoraPeftError(f"'{weights}': '{m_part[0]}' is a DoRA magnitude on a "
                          f"target_parameters weight, which PEFT does not have")
    f = _Found(kind, key_a, lora_a, key_b, lora_b, r, alpha,
               None if m_part is None else m_part[1], None if m_part is None else m_part[0],
               transposed)
    found.setdefault(e.index, (e, {}))[1][idx] = f

  for name, parts in lora.items():
    base, depth = names.unnest(name)
    emb = "embA" in parts or "embB" in parts
    if emb and ("A" in parts or "B" in parts):
      raise LoraPeftError(f"'{weights}': module '{name}' has both lora_A/lora_B and "
                          f"lora_embedding_A/B tensors")
    if not emb and "A" not in parts and "B" not in parts:
      raise LoraPeftError(f"'{weights}': '{parts['m'][0]}' has no lora_A/lora_B beside it")
    a_part, b_part = _halves(parts, name, emb, weights)
    key_a, lora_a = a_part
    if emb:
      hits = [(e, i) for e, i in index.find(name) if e.is_embedding] if not depth else []
      kind = kinds.EMBEDDING
    else:
      hits = [(e, i) for e, i in index.find(name) if e.is_kernel] if not depth else []
      if not hits and config.get("target_parameters"):
        by_param_module[base][depth] = (name, parts)
        continue
      if not hits and not depth and any(name in rules.tied_to(m) for m in rules.tied):
        tied[name] = parts
        continue
      kind = kinds.CONV if lora_a.ndim > 2 else kinds.LINEAR
    if not hits:
      hint = ("; the folder ties modules to its embedding (ensure_weight_tying): if the "
              "model's output head is its embedding table, say so with Rules(tied=...) "
              "(Rules.llama(tie_word_embeddings=True))" if config.get("ensure_weight_tying")
              else "")
      raise LoraPeftError(
          f"'{weights}': key '{key_a}' is for PyTorch module '{name}', which no "
          f"parameter maps to under these rules (nearest module names: "
          f"{index.near(name)}){hint}")
    if len(hits) > 1:
      raise LoraPeftError(f"'{weights}': module '{name}' maps to several parameters: "
                          f"{[e.path for e, _ in hits]}")
    e, idx = hits[0]
    if e.leaf is None:
      raise LoraPeftError(f"'{e.path}' (PyTorch module '{name}') is None in params; "
                          f"pass the base parameters")
    if peft_config.targets(config, name) is False:
      raise LoraPeftError(
          f"'{weights}': key '{key_a}' is for module '{name}', which target_modules "
          f"{config.get('target_modules')!r} does not select; PEFT would ignore it")
    record(e, idx, kind, name, a_part, b_part, parts)
    if emb:
      embeddings[name] = (e, parts)

  for base, depths in by_param_module.items():
    _match_parameters(base, depths, index, config, rules, weights, record)
  _check_tied(embeddings, tied, config, rules, weights)
  return found


def _match_parameters(base: str, depths: Mapping[int, tuple[str, Any]], index: _Index, config,
                      rules: Rules, weights: str, record) -> None:
  """The factors of the parameters of PyTorch module ``base`` that
  target_parameters adapts: PEFT nests one wrapper per parameter, in the
  order the module registers them (the first innermost, named
  ``<module>.base_layer...``)."""
  cands = [(e, i) for e, i in index.find(base)
           if e.leaf is not None and not e.is_kernel and not e.is_embedding
           and peft_config.targets_parameter(config, f"{base}.{e.param_name}")]
  name0, parts0 = depths[min(depths)]
  if not cands:
    raise LoraPeftError(
        f"'{weights}': key '{_halves(parts0, name0, False, weights)[0][0]}' is for module "
        f"'{base}', but no parameter of it that target_parameters "
        f"{config.get('target_parameters')!r} selects maps to a parameter under these rules "
        f"(nearest module names: {index.near(base)})")
  if sorted(depths) != list(range(len(cands))):
    raise LoraPeftError(
        f"'{weights}': module '{base}' has {len(depths)} adapted parameter wrapper(s) in the "
        f"file but target_parameters selects {len(cands)} of its parameters "
        f"({[e.param_name for e, _ in cands]})")
  k = len(cands)
  order = None
  if k == 1:
    order = cands
  elif all(e.param_name in rules.parameter_order for e, _ in cands):
    order = sorted(cands, key=lambda c: rules.parameter_order.index(c[0].param_name))
  assignment: dict[int, tuple[_Entry, Any]] = {}
  if order is not None:
    assignment = {k - 1 - pos: c for pos, c in enumerate(order)}
  else:    # the shapes may tell which wrapper is which parameter
    for depth, (name, parts) in depths.items():
      (_, lora_a), (_, lora_b) = _halves(parts, name, False, weights)
      fits = []
      for e, i in cands:
        pname = f"{base}.{e.param_name}"
        shape = tuple(e.leaf.shape)[e.n_stack:]
        r = peft_config.pattern_value(config.get("rank_pattern"), pname, config["r"])
        lay = _default_layout(kinds.PARAMETER, len(shape), 0, rules.is_transposed(pname))
        if kinds.torch_shapes(kinds.PARAMETER, shape, lay, r, rules.is_transposed(pname)) == (
            tuple(lora_a.shape), tuple(lora_b.shape)):
          fits.append((e, i))
      if len(fits) != 1:
        raise LoraPeftError(
            f"'{weights}': cannot tell which of the parameters "
            f"{[e.param_name for e, _ in cands]} of module '{base}' the factors of '{name}' "
            f"adapt (PEFT names them by the order the module registers them); pass "
            f"Rules(parameter_order=[...]) in the order of the module's __init__")
      assignment[depth] = fits[0]
    if len({id(e) for e, _ in assignment.values()}) != k:
      raise LoraPeftError(f"'{weights}': the factors of module '{base}' do not fit its "
                          f"parameters one to one; pass Rules(parameter_order=[...])")
  for depth, (e, idx) in assignment.items():
    name, parts = depths[depth]
    pname = f"{base}.{e.param_name}"
    a_part, b_part = _halves(parts, name, False, weights)
    record(e, idx, kinds.PARAMETER, pname, a_part, b_part, parts,
           transposed=rules.is_transposed(pname))


def _check_tied(embeddings, tied, config, rules: Rules, weights: str) -> None:
  """A tied table: jlora adapts it in every use; the file must adapt the tied
  modules alike (PEFT's ensure_weight_tying), with the same factors."""
  for name, (e, parts) in embeddings.items():
    others = rules.tied_to(name)
    if not others:
      continue
    if not config.get("ensure_weight_tying") or name.rpartition(".")[2] != "embed_tokens":
      raise LoraPeftError(
          f"'{weights}': the table of '{name}' is tied to {list(others)}, and this folder "
          f"adapts its lookup only (PEFT's ensure_weight_tying is "
          f"{'off' if not config.get('ensure_weight_tying') else 'only for embed_tokens'}); "
          f"jlora adapts a tied table in every use, so it would compute another model")
    if "m" in parts:
      raise LoraPeftError(f"'{weights}': DoRA on the tied table of '{name}' (PEFT keeps a "
                          f"magnitude per dimension there and one per token on "
                          f"{list(others)}), which one table cannot hold")
  for name, parts in tied.items():
    owner = next(m for m in rules.tied if name in rules.tied_to(m))
    if owner not in embeddings:
      raise LoraPeftError(f"'{weights}': module '{name}' is adapted, but it is tied to "
                          f"'{owner}', whose table the folder leaves alone")
    (_, lora_a), (_, lora_b) = _halves(parts, name, False, weights)
    emb_parts = embeddings[owner][1]
    same = (lora_a.shape == emb_parts["embB"][1].T.shape
            and np.array_equal(lora_a, emb_parts["embB"][1].T)
            and lora_b.shape == emb_parts["embA"][1].T.shape
            and np.array_equal(lora_b, emb_parts["embA"][1].T))
    if not same or "m" in parts:
      raise LoraPeftError(f"'{weights}': the factors of '{name}', which is tied to "
                          f"'{owner}', are not that embedding's (transposed)")


# A LoRA module found in the file: kind, keys, tensors, rank, alpha, magnitude.


def _kernel_layout(e: _Entry, found: _Found, rules: Rules, weights: str) -> Layout:
  """The layout of a plain 2-D kernel: as the rules' kernel_order says, checked
  against the file's shapes; with no kernel order, what the shapes tell."""
  shape = tuple(e.leaf.shape)
  key_a, lora_a, lora_b = found.key_a, found.lora_a, found.lora_b
  fan_in, fan_out = lora_a.shape[1], lora_b.shape[0]
  fits = axes.splits(shape, 0, fan_in, rules.kernel_order, fan_out)
  if len(fits) == 1:
    return fits[0]
  if len(fits) > 1:
    raise LoraLayoutError(
        f"'{e.path}' {shape}: cannot tell whether this square kernel is stored (in, out) or "
        f"(out, in): the rules do not say (kernel_order=None) and the shapes in "
        f"'{weights}' fit both; jlora does not guess; {axes.kernel_order_hint(e.path)}")
  other = axes.splits(shape, 0, fan_in, None, fan_out)
  if other:
    stored = "(out, in)" if axes.layout_order(other[0]) == "out_in" else "(in, out)"
    raise LoraPeftError(
        f"'{weights}': '{key_a}' ({lora_a.shape[0]}, {fan_in}) and its lora_B "
        f"{tuple(lora_b.shape)} fit '{e.path}' {shape} only if it is stored {stored}, but "
        f"the rules say kernel_order={rules.kernel_order!r}; "
        f"{axes.kernel_order_hint(e.path)}")
  return axes.kernel_layout(rules.kernel_order or "in_out")   # the size check below names it


def _default_layout(kind: str, ndim: int, n_stack: int, transposed: bool,
                    tied: bool = False) -> Layout:
  """The layout a module kind gives its weight when none is passed, with
  ``n_stack`` leading module-stack axes: a convolution's ``(*window, in, out)``,
  an embedding's ``(vocab, d)`` looked up by row (by the output head's
  contraction over ``d`` for a tied table), a parameter as PEFT reads it
  (``(E, in, out)``, or ``(E, out, in)`` transposed; a 2-D one ``(out, in)``)."""
  stack = tuple(range(n_stack))
  k = n_stack
  if kind == kinds.CONV:
    return Layout(tuple(range(k, ndim - 1)), (ndim - 1,), stack)
  if kind == kinds.EMBEDDING:
    return Layout((k + 1,), (k,), stack) if tied else Layout((k,), (k + 1,), stack)
  if ndim - k == 3:
    ins, outs = ((k + 1,), (k + 2,)) if not transposed else ((k + 2,), (k + 1,))
    return Layout(ins, outs, stack + (k,))
  return Layout((k + 1,), (k,), stack)


def _assemble_factors(e: _Entry, by_idx: Mapping[tuple[int, ...], _Found],
                      layouts: Mapping[str, Layout] | None, rules: Rules, weights: str):
  """One weight's ``(layout, a, b, rank, alpha, magnitude)`` from its modules' tensors."""
  shape = tuple(e.leaf.shape)
  first = next(iter(by_idx.values()))
  kind = first.kind
  explicit = (layouts or {}).get(e.path)
  if kind == kinds.LINEAR:
    if explicit is None and len(shape) == 2 and e.n_stack == 0 and () in by_idx:
      layout = _kernel_layout(e, by_idx[()], rules, weights)
    else:
      layout = resolve_layout(e.path, e.leaf, LoraSpec(), layouts)
  else:
    tied = bool(rules.tied_to(names.first_module(e.template)))
    layout = explicit or _default_layout(kind, len(shape), e.n_stack, first.transposed, tied)
    layout.check(shape, e.path)
  n_slice_stack = len(layout.stack_axes) - e.n_stack
  if n_slice_stack != (1 if kind == kinds.PARAMETER and len(shape) - e.n_stack == 3 else 0):
    raise LoraPeftError(
        f"'{e.path}': the rules name it '{e.template}' with {e.n_stack} stack "
        f"index(es), but its layout {layout} has {len(layout.stack_axes)} stack axes")
  lay = kinds.slice_layout(layout, e.n_stack)
  kinds.check_slice(kind, e.path, lay)
  stack_shape = tuple(shape[ax] for ax in layout.stack_axes[:e.n_stack])
  want = set(np.ndindex(*stack_shape))
  beyond = sorted(set(by_idx) - want)
  if beyond:
    raise LoraPeftError(f"'{weights}': key '{by_idx[beyond[0]].key_a}' is beyond the stack "
                        f"of '{e.path}' (stack shape {stack_shape})")
  missing = sorted(want - set(by_idx))
  if missing:
    modules = [names.fill(e.template, m) for m in missing[:3]]
    raise LoraPeftError(
        f"'{weights}': missing keys '{names.lora_key(modules[0], 'A')}' / "
        f"'.lora_B.weight' ({len(missing)} module(s) of stacked '{e.path}': {modules}); "
        f"jlora never leaves a factor at its initial value")
  settings = {(f.r, f.alpha) for f in by_idx.values()}
  if len(settings) > 1:
    raise LoraPeftError(
        f"'{weights}': the modules of stacked '{e.path}' have different (rank, alpha) "
        f"{sorted(settings)}; jlora keeps one rank and scale per stacked weight")
  gone = layout.stack_axes[:e.n_stack]
  slice_shape = tuple(shape[ax] for ax in range(len(shape)) if ax not in gone)
  a_parts, b_parts, m_parts = [], [], []
  for idx in sorted(by_idx):
    f = by_idx[idx]
    want_a, want_b = kinds.torch_shapes(kind, slice_shape, lay, f.r, f.transposed)
    if tuple(f.lora_a.shape) != want_a or tuple(f.lora_b.shape) != want_b:
      raise LoraPeftError(
          f"'{weights}': '{f.key_a}' {f.lora_a.shape} and its lora_B {f.lora_b.shape} do not "
          f"fit '{e.path}' {shape} with layout {layout}: expected {want_a} and {want_b}")
    a, b = kinds.from_torch(kind, f.lora_a, f.lora_b, lay, slice_shape, f.r, f.transposed)
    a_parts.append(a)
    b_parts.append(b)
    if f.magnitude is not None:
      want_m = kinds.magnitude_shape(kind, slice_shape, lay)
      if kind == kinds.EMBEDDING and lay.out_axes != (1,):
        raise LoraPeftError(
            f"'{weights}': '{f.key_m}' is PEFT's DoRA magnitude per embedding dimension, but "
            f"the layout of '{e.path}' {layout} puts the vocabulary on the output axis")
      if tuple(f.magnitude.shape) != want_m:
        raise LoraPeftError(f"'{weights}': '{f.key_m}' has shape {f.magnitude.shape}, not "
                            f"{want_m} as '{e.path}' {shape} needs")
      m_parts.append(kinds.magnitude_from_torch(kind, f.magnitude, lay, slice_shape))
  a = np.stack(a_parts).reshape(stack_shape + a_parts[0].shape)
  b = np.stack(b_parts).reshape(stack_shape + b_parts[0].shape)
  m = np.stack(m_parts).reshape(stack_shape + m_parts[0].shape) if m_parts else None
  r, alpha = next(iter(settings))
  return layout, a, b, r, alpha, m


def _check_targets_covered(index: _Index, found, config, weights: str) -> None:
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


def _check_copies(copies, index: _Index, rules: Rules, layouts, weights: str) -> None:
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


def _full_kernel(e: _Entry, key: str, value: np.ndarray, rules: Rules,
                 layouts: Mapping[str, Layout] | None, module: str, weights: str) -> np.ndarray:
  """A kernel trained in full, from PyTorch's orientation to the Flax one."""
  torch_order = "in_out" if rules.is_in_out(module) else "out_in"
  explicit = (layouts or {}).get(e.path)
  flax_order = axes.layout_order(explicit) if explicit is not None else rules.kernel_order
  if flax_order is None:
    want = tuple(e.leaf.shape[e.n_stack:]) if e.leaf is not None else None
    fits = [o for o, v in ((torch_order, value), ("flipped", value.T)) if v.shape == want]
    if len(fits) != 1:
      raise LoraLayoutError(
          f"'{e.path}': cannot tell how the kernel '{key}' {tuple(value.shape)} of "
          f"'{weights}' (trained in full) maps onto it: the rules do not say whether Flax "
          f"stores it (in, out) or (out, in) (kernel_order=None) and its shape does not "
          f"tell; {axes.kernel_order_hint(e.path)}")
    return value if fits[0] == torch_order else value.T
  return value if flax_order == torch_order else value.T


def _load_full_weights(full, index: _Index, found, config, rules: Rules,
                       weights: str, layouts: Mapping[str, Layout] | None = None
                       ) -> dict[int, jax.Array]:
  """modules_to_save tensors -> plain trainable leaves, by leaf index."""
  parts: dict[int, dict[tuple[int, ...], tuple[str, np.ndarray]]] = collections.defaultdict(dict)
  entries = {e.index: e for e in index.entries}
  for (module, param), (key, value) in full.items():
    hits = [(e, i) for e, i in index.find(module) if e.torch_name == param]
    if not hits:
      raise LoraPeftError(
          f"'{weights}': key '{key}' (modules_to_save) matches no parameter under these "
          f"rules (nearest module names: {index.near(module)})")
    if len(hits) > 1:
      raise LoraPeftError(f"'{weights}': key '{key}' maps to several parameters: "
                          f"{[e.path for e, _ in hits]}")
    e, idx = hits[0]
    if e.index in found:
      raise LoraPeftError(f"'{weights}': key '{key}' trains '{e.path}' in full, which the "
                          f"file also adapts with LoRA")
    if e.is_kernel:
      if value.ndim != 2:
        raise LoraPeftError(f"'{weights}': key '{key}' has shape {value.shape}, not 2-D")
      value = _full_kernel(e, key, value, rules, layouts, module, weights)
    parts[e.index][idx] = (key, value)
  # A saved module comes whole: each of its parameters must be in the file.
  saved_templates = {entries[i].template for i in parts}
  for e in index.entries:
    if e.leaf is None or e.index in parts or e.index in found:
      continue
    module = names.first_module(e.template)
    if e.template in saved_templates or peft_config.is_saved_module(config, module):
      raise LoraPeftError(
          f"'{weights}': no '{names.full_key(module, e.torch_name)}' for '{e.path}', although "
          f"modules_to_save {config.get('modules_to_save')!r} selects module '{module}'")
  out: dict[int, jax.Array] = {}
  for i, by_idx in parts.items():
    e = entries[i]
    first_key, first = by_idx[min(by_idx)]
    if e.n_stack:
      if e.leaf is not None:
        lead = tuple(e.leaf.shape[:e.n_stack])
      else:
        lead = tuple(max(k[j] for k in by_idx) + 1 for j in range(e.n_stack))
      bad = sorted(set(np.ndindex(*lead)) ^ set(by_idx))
      if bad:
        raise LoraPeftError(f"'{weights}': modules_to_save tensors of stacked '{e.path}' "
                            f"do not cover its stack {lead} (index {bad[0]})")
      value = np.stack([by_idx[k][1] for k in sorted(by_idx)]).reshape(lead + first.shape)
    else:
      value = first
    if e.leaf is not None and tuple(value.shape) != tuple(e.leaf.shape):
      raise LoraPeftError(f"'{weights}': key '{first_key}' gives '{e.path}' shape "
                          f"{value.shape}, but the parameter is {tuple(e.leaf.shape)}")
    out[i] = jnp.asarray(value, dtype=e.leaf.dtype if e.leaf is not None else None)
  return out


def _spec_of(config, factors: Mapping[str, tuple], extras: Sequence[str], dtype,
             where: str) -> LoraSpec:
  """A LoraSpec naming exactly the loaded paths, with their ranks and alphas."""
  r_global, alpha_global = int(config["r"]), float(config["lora_alpha"])
  ranks = {p: f[3] for p, f in factors.items()}
  alphas = {p: float(f[4]) for p, f in factors.items()}
  layouts = {p: f[0] for p, f in factors.items()
             if f[0] != Layout.default(f[0].ndim)}
  try:
    return LoraSpec(
        rank=r_global, alpha=alpha_global,
        targets="|".join(re.escape(p) for p in sorted(factors)),
        rank_pattern=_anchored({p: r for p, r in ranks.items() if r != r_global}),
        alpha_pattern=_anchored(
            {p: a for p, a in alphas.items() if a != alpha_global}),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        dropout=float(config.get("lora_dropout") or 0.0), dtype=dtype,
        extra_trainable="|".join(re.escape(p) for p in extras) if extras else None,
        layouts=_anchored(layouts))
  except LoraSpecError as err:
    raise LoraPeftError(f"'{where}': {err}") from None

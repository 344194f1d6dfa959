"""PEFT adapter folders: export jlora adapters to PyTorch PEFT, import PEFT's.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and
``adapter_model.safetensors``. The tensors are keyed by PyTorch module name,
``base_model.model.<module>.lora_A.weight`` of shape ``(r, in)`` and
``...lora_B.weight`` of shape ``(out, r)``; modules trained in full
(``modules_to_save``) are stored as ``base_model.model.<module>.<param>``.

Flax names parameters by path (``transformer/h/0/attn/c_attn/kernel``),
PyTorch by module (``transformer.h.0.attn.c_attn``): a ``PeftRules`` (or a
plain function) says how one becomes the other. Weights that ``nn.scan``
stacks along a layer axis become one PyTorch module per layer.

Only JSON and safetensors are read (``safetensors.numpy``): no torch, no
pickle, no code from the folder runs.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import math
import os
import re
import string
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import LoraPeftError, LoraSpecError
from jlora._paths import flatten_with_paths
from jlora.lora_param import LoraParam
from jlora.transform import resolve_layout
from jlora.layout import Layout
from jlora.spec import LoraSpec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModel wraps the base model as ``base_model.model``; keys without this
# prefix load in PEFT with only a warning and every B left at zero.
KEY_PREFIX = "base_model.model."

# Flax leaf name -> PyTorch parameter name, for modules trained in full.
DEFAULT_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight",
                      "embedding": "weight"}


# -- name rules -------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _split_template(template: str) -> list[tuple[str, str]]:
  """``"a/{x}/b"`` -> ``[("lit", "a/"), ("var", "x"), ("lit", "/b")]``."""
  parts, pos = [], 0
  for m in _PLACEHOLDER.finditer(template):
    if m.start() > pos:
      parts.append(("lit", template[pos:m.start()]))
    parts.append(("var", m.group(1)))
    pos = m.end()
  if pos < len(template):
    parts.append(("lit", template[pos:]))
  return parts


@dataclasses.dataclass(frozen=True)
class _Pattern:
  flax: str
  torch: str

  def __post_init__(self):
    fvars = [v for kind, v in _split_template(self.flax) if kind == "var"]
    tvars = [v for kind, v in _split_template(self.torch) if kind == "var"]
    for side, names in (("flax", fvars), ("torch", tvars)):
      if len(set(names)) != len(names):
        raise LoraSpecError(f"PeftRules pattern {(self.flax, self.torch)}: a placeholder "
                            f"appears twice on the {side} side")
    missing = sorted(set(fvars) - set(tvars))
    if missing:
      raise LoraSpecError(f"PeftRules pattern {(self.flax, self.torch)}: placeholders "
                          f"{missing} of the Flax side are not used in the module name")

  def _regex(self, side: str) -> re.Pattern:
    fvars = {v for kind, v in _split_template(self.flax) if kind == "var"}
    out = []
    for kind, text in _split_template(self.flax if side == "flax" else self.torch):
      if kind == "lit":
        out.append(re.escape(text))
      elif side == "flax":
        out.append(f"(?P<{text}>[^/]+(?:/[^/]+)*)")
      elif text in fvars:
        out.append(f"(?P<{text}>[^.]+(?:\\.[^.]+)*)")
      else:  # a stack index
        out.append(f"(?P<{text}>\\d+)")
    return re.compile("".join(out))

  def forward(self, module_path: str) -> str | None:
    m = self._regex("flax").fullmatch(module_path)
    if m is None:
      return None
    out, n_stack = [], 0
    for kind, text in _split_template(self.torch):
      if kind == "lit":
        out.append(text)
      elif text in m.groupdict():
        out.append(m.group(text).replace("/", "."))
      else:
        out.append("{%d}" % n_stack)
        n_stack += 1
    return "".join(out)

  def backward(self, module: str) -> tuple[str, tuple[int, ...]] | None:
    m = self._regex("torch").fullmatch(module)
    if m is None:
      return None
    fvars = {v for kind, v in _split_template(self.flax) if kind == "var"}
    index = tuple(int(m.group(v)) for kind, v in _split_template(self.torch)
                  if kind == "var" and v not in fvars)
    path = "".join(text if kind == "lit" else m.group(text).replace(".", "/")
                   for kind, text in _split_template(self.flax))
    return path, index


@dataclasses.dataclass(frozen=True)
class PeftRules:
  """How Flax parameter paths name the PyTorch modules that PEFT sees.

  A rule maps a parameter path minus its leaf name (the *module path*, e.g.
  ``transformer/h/0/attn/c_attn`` for ``.../c_attn/kernel``) to a PyTorch
  module name. Each pattern is a pair ``(flax_template, torch_template)``;
  the first whose Flax side matches the whole module path wins:

  * ``{name}`` on the Flax side matches one or more '/'-separated segments
    and is written on the PyTorch side with '.' between them;
  * a placeholder that appears only on the PyTorch side (``{layer}``) is a
    stack index: weights stacked by ``nn.scan`` become one module per index
    of their stack axis (the stack axes of the LoRA layout, in order).

  The leaf name becomes the PyTorch parameter name through ``leaf_names``
  (``kernel`` -> ``weight``, ``scale`` -> ``weight``, ...); this matters for
  weights trained in full (PEFT's ``modules_to_save``), which are stored
  under their PyTorch names and layouts.

  Instead of a ``PeftRules``, ``save_peft`` and ``load_peft`` also accept a
  function ``fn(path) -> str | None`` from a full parameter path to the
  module name, with ``"{}"`` fields for stack indices
  (``"model.layers.{}.self_attn.q_proj"``); ``None`` means "no module".

  Attributes:
    patterns: ``(flax_template, torch_template)`` pairs, tried in order.
    fan_in_fan_out: which PyTorch modules store their weight ``(in, out)``
      (``transformers``' ``Conv1D``, as in GPT-2) rather than ``(out, in)``
      (``nn.Linear``): ``True`` for all, ``False`` for none, or a regex matched
      in full against the module name. Decides the config's
      ``fan_in_fan_out`` and whether a fully trained kernel is transposed.
    leaf_names: Flax leaf name -> PyTorch parameter name.
    kernel_leaves: leaf names of linear weights: the leaves LoRA factors
      belong to when a file is read, and the ones stored ``(in, out)`` in
      Flax, so transposed for an ``nn.Linear`` module.
    function: if given, used instead of ``patterns`` (see above).

  Example:
    A model whose Flax names differ from the PyTorch ones: write one pattern
    per difference, then a catch-all.

    >>> rules = PeftRules(patterns=[
    ...     ("params/blocks_{i}/attn/{proj}", "model.layers.{i}.self_attn.{proj}"),
    ...     ("params/{module}", "{module}")])
    >>> rules("params/blocks_3/attn/q_proj/kernel")
    'model.layers.3.self_attn.q_proj'
    >>> rules.param_path("model.layers.3.self_attn.q_proj")
    ('params/blocks_3/attn/q_proj/kernel', ())

    The ready-made rules:

    >>> rules = PeftRules.scanned(stack="params/layers", prefix="model.layers",
    ...                           renames={"query": "self_attn.q_proj"})
    >>> rules("params/layers/query/kernel")          # one module per layer
    'model.layers.{0}.self_attn.q_proj'
    >>> rules("params/embed/embedding")
    'embed'
    >>> rules.param_path("model.layers.3.self_attn.q_proj")
    ('params/layers/query/kernel', (3,))
    >>> PeftRules.gpt2()("transformer/h/0/attn/c_attn/kernel")
    'transformer.h.0.attn.c_attn'
  """

  patterns: Sequence[tuple[str, str]] = (("params/{module}", "{module}"),
                                         ("{module}", "{module}"))
  fan_in_fan_out: Union[bool, str] = False
  leaf_names: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: dict(DEFAULT_LEAF_NAMES))
  kernel_leaves: Sequence[str] = ("kernel",)
  function: Callable[[str], str | None] | None = None

  def __post_init__(self):
    object.__setattr__(self, "patterns", tuple(tuple(p) for p in self.patterns))
    object.__setattr__(self, "kernel_leaves", tuple(self.kernel_leaves))
    for p in self.patterns:
      if len(p) != 2 or not all(isinstance(s, str) for s in p):
        raise LoraSpecError(f"PeftRules patterns are (flax_template, torch_template) "
                            f"string pairs, got {p!r}")
    object.__setattr__(self, "_compiled", tuple(_Pattern(*p) for p in self.patterns))
    if isinstance(self.fan_in_fan_out, str):
      try:
        re.compile(self.fan_in_fan_out)
      except re.error as e:
        raise LoraSpecError(f"PeftRules.fan_in_fan_out: invalid regex "
                            f"{self.fan_in_fan_out!r}: {e}") from None

  # Ready-made rules ----------------------------------------------------------

  @classmethod
  def generic(cls, *, fan_in_fan_out: Union[bool, str] = False) -> "PeftRules":
    """'/' becomes '.', the leaf name and a leading ``params`` collection go.

    Fits models whose Flax module tree mirrors the PyTorch one (Flax NNX
    ``blocks/0/query/kernel`` -> ``blocks.0.query``).
    """
    return cls(fan_in_fan_out=fan_in_fan_out)

  @classmethod
  def gpt2(cls) -> "PeftRules":
    """Hugging Face GPT-2 (``GPT2LMHeadModel``) and Flax ports named like it.

    ``transformer/h/0/attn/c_attn/kernel`` <-> ``transformer.h.0.attn.c_attn``;
    ``c_attn``, ``q_attn``, ``c_proj`` and ``c_fc`` are ``Conv1D`` modules
    (weights stored ``(in, out)``, PEFT's ``fan_in_fan_out=True``).
    """
    return cls(fan_in_fan_out=r"(?:.*\.)?(?:c_attn|q_attn|c_proj|c_fc)")

  @classmethod
  def scanned(cls, *, stack: str = "params/layers", prefix: str = "model.layers",
              renames: Mapping[str, str] | None = None,
              fan_in_fan_out: Union[bool, str] = False) -> "PeftRules":
    """A Linen ``nn.scan`` stack: ``{stack}/<name>`` -> ``{prefix}.{i}.<name>``.

    ``i`` is the index along the weight's stack axis. ``renames`` maps a Flax
    module path inside the stack to the PyTorch one
    (``{"attn/query": "self_attn.q_proj"}``). Parameters outside the stack
    follow the generic rule.
    """
    pats = [(f"{stack}/{flax}", f"{prefix}.{{layer}}.{torch}")
            for flax, torch in (renames or {}).items()]
    pats.append((f"{stack}/{{name}}", f"{prefix}.{{layer}}.{{name}}"))
    pats += list(cls.__dataclass_fields__["patterns"].default)
    return cls(patterns=tuple(pats), fan_in_fan_out=fan_in_fan_out)

  # Mapping -------------------------------------------------------------------

  def __call__(self, path: str) -> str | None:
    """The module name of a parameter path, with ``{0}``... for stack indices."""
    if self.function is not None:
      return self.function(path)
    module_path = path.rpartition("/")[0]
    if not module_path:
      return None
    for pat in self._compiled:
      name = pat.forward(module_path)
      if name is not None:
        return name
    return None

  def param_path(self, module: str, leaf: str = "kernel"
                 ) -> tuple[str, tuple[int, ...]] | None:
    """The reverse: ``(parameter path, stack index)`` of a PyTorch module.

    Only for pattern rules; ``load_peft`` itself inverts the forward mapping
    over the actual parameters, so a function rule needs no reverse.
    """
    if self.function is not None:
      raise LoraSpecError("PeftRules.param_path needs pattern rules, not a function")
    for pat in self._compiled:
      found = pat.backward(module)
      if found is not None:
        return f"{found[0]}/{leaf}", found[1]
    return None

  def is_in_out(self, module: str) -> bool:
    """Whether the PyTorch module stores its weight ``(in, out)``."""
    if isinstance(self.fan_in_fan_out, bool):
      return self.fan_in_fan_out
    return re.fullmatch(self.fan_in_fan_out, module) is not None


RulesLike = Union[PeftRules, Callable[[str], Union[str, None]]]


def _as_rules(rules: RulesLike) -> PeftRules:
  if isinstance(rules, PeftRules):
    return rules
  if callable(rules):
    return PeftRules(function=rules)
  raise LoraSpecError(f"rules must be a jlora.PeftRules or a function path -> module "
                      f"name, got {rules!r}")


def _stack_fields(template: str) -> list[int]:
  """Positions of the stack-index fields of a module-name template."""
  out, auto = [], 0
  for _, field, _, _ in string.Formatter().parse(template):
    if field is None:
      continue
    if field == "":
      out.append(auto)
      auto += 1
    elif field.isdigit():
      out.append(int(field))
    else:
      raise LoraSpecError(f"module name template {template!r}: fields must be '{{}}' or "
                          f"'{{0}}', '{{1}}'... (stack indices), got {{{field}}}")
  return out


def _n_stack(template: str) -> int:
  fields = _stack_fields(template)
  return max(fields) + 1 if fields else 0


def _template_regex(template: str) -> tuple[re.Pattern, list[int]]:
  out, positions, auto = [], [], 0
  for lit, field, _, _ in string.Formatter().parse(template):
    out.append(re.escape(lit))
    if field is not None:
      out.append(r"(\d+)")
      positions.append(auto if field == "" else int(field))
      auto += field == ""
  return re.compile("".join(out)), positions


# -- PyTorch <-> jlora factor layouts ----------------------------------------


def _argsort(axes: Sequence[int]) -> list[int]:
  return sorted(range(len(axes)), key=lambda i: axes[i])


def _factors_to_torch(a: np.ndarray, b: np.ndarray, layout: Layout
                      ) -> tuple[np.ndarray, np.ndarray]:
  """One slice's ``a (*in, r)``, ``b (r, *out)`` -> ``lora_A (r, in)``, ``lora_B (out, r)``.

  The in (out) axes are flattened in the weight's own axis order, as a
  reshape of the weight to 2-D would.
  """
  r = a.shape[-1]
  ni = len(layout.in_axes)
  a = np.transpose(a, _argsort(layout.in_axes) + [ni]).reshape(-1, r)
  b = np.transpose(b, [0] + [1 + i for i in _argsort(layout.out_axes)]).reshape(r, -1)
  return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)


def _factors_from_torch(lora_a: np.ndarray, lora_b: np.ndarray, layout: Layout,
                        shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of ``_factors_to_torch`` for a weight (slice) of ``shape``."""
  r = lora_a.shape[0]
  in_sorted = sorted(layout.in_axes)
  out_sorted = sorted(layout.out_axes)
  a = lora_a.T.reshape([shape[i] for i in in_sorted] + [r])
  a = np.transpose(a, [in_sorted.index(ax) for ax in layout.in_axes] + [len(in_sorted)])
  b = lora_b.T.reshape([r] + [shape[i] for i in out_sorted])
  b = np.transpose(b, [0] + [1 + out_sorted.index(ax) for ax in layout.out_axes])
  return a, b


def _clean_number(x: float) -> int | float:
  """An alpha recovered from a float scale: 7.999999999 -> 8."""
  nearest = round(x)
  if abs(x - nearest) <= 1e-6 * max(1.0, abs(x)):
    return int(nearest)
  return float(x)


# -- the config ----------------------------------------------------------------

# Options that change what an adapter computes and that jlora does not
# implement: loading them would silently give a different model.
_MUST_BE_OFF = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable tokens",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "the KaSA variant",
    "monteclora_config": "the MonteCLoRA variant",
    "velora_config": "the VeLoRA variant",
}
# Keys that do not change the adapted function (metadata, initialisation of
# a fresh adapter, distribution) or that load_peft interprets itself.
_KNOWN = {
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "use_rslora", "modules_to_save", "lora_dropout", "bias", "fan_in_fan_out",
    "init_lora_weights", "auto_mapping", "base_model_name_or_path", "revision",
    "task_type", "inference_mode", "peft_version", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "ensure_weight_tying", "runtime_config",
}
# init_lora_weights values whose adapter is relative to the unmodified base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _check_config(config: Mapping[str, Any], where: str) -> None:
  if not isinstance(config, Mapping):
    raise LoraPeftError(f"{where}: expected a JSON object, got {type(config).__name__}")
  if "peft_type" not in config:
    raise LoraPeftError(f"{where}: no 'peft_type' (PEFT itself cannot load this config)")
  if config["peft_type"] != "LORA":
    raise LoraPeftError(f"{where}: peft_type {config['peft_type']!r} is not supported; "
                        f"jlora reads LoRA adapters only (peft_type 'LORA')")
  if config.get("bias", "none") != "none":
    raise LoraPeftError(
        f"{where}: bias={config['bias']!r} is not supported (the adapter carries trained "
        f"biases of the base model); only bias='none' is")
  for key, what in _MUST_BE_OFF.items():
    value = config.get(key)
    if value not in (None, False, {}, [], ""):
      raise LoraPeftError(f"{where}: {key}={value!r} ({what}) is not supported by jlora")
  init = config.get("init_lora_weights", True)
  if init not in _PLAIN_INITS:
    raise LoraPeftError(
        f"{where}: init_lora_weights={init!r} is not supported: such an adapter is "
        f"relative to a base model PEFT modified at initialisation (PiSSA, OLoRA, "
        f"CorDA, LoftQ, LoRA-GA) or is a LoRA variant (MiCA). Convert it in PEFT with "
        f"save_pretrained(..., path_initial_model_for_weight_conversion=...) first")
  for key, value in config.items():
    if key not in _KNOWN and key not in _MUST_BE_OFF and value not in (None, False, {}, [], ""):
      raise LoraPeftError(f"{where}: unknown option {key}={value!r}; jlora cannot tell "
                          f"whether it changes the adapter, so it refuses to guess")
  r = config.get("r")
  if isinstance(r, bool) or not isinstance(r, int) or r < 1:
    raise LoraPeftError(f"{where}: r must be an integer >= 1, got {r!r}")
  alpha = config.get("lora_alpha")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise LoraPeftError(f"{where}: lora_alpha must be a number > 0, got {alpha!r}")
  for key in ("rank_pattern", "alpha_pattern"):
    if not isinstance(config.get(key) or {}, Mapping):
      raise LoraPeftError(f"{where}: {key} must be an object, got {config[key]!r}")


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
  # PEFT's get_pattern_key: the first key matching a '.'-aligned suffix.
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _is_saved_module(config: Mapping[str, Any], module: str) -> bool:
  # PEFT's _set_trainable: a plain suffix test, no '.' boundary.
  return any(module.endswith(m) for m in config.get("modules_to_save") or ())


def _peft_targets(config: Mapping[str, Any], module: str) -> bool | None:
  """Whether PEFT's check_target_module_exists selects ``module``; None: unknown."""
  exclude = config.get("exclude_modules")
  if exclude:
    if isinstance(exclude, str):
      if re.fullmatch(exclude, module):
        return False
    elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
      return False
  for m in config.get("modules_to_save") or ():
    if re.match(rf"(^|.*\.){m}($|\..*)", module):
      return False
  targets = config.get("target_modules")
  if targets is None or targets == "all-linear":
    return None  # resolved by PEFT from the PyTorch module types
  if isinstance(targets, str):
    return re.fullmatch(targets, module) is not None
  if module in targets:
    return True
  found = any(module.endswith(f".{t}") for t in targets)
  layers = config.get("layers_to_transform")
  if found and layers not in (None, []):
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
      match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
      for p in [pattern] if isinstance(pattern, str) else pattern:
        match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
        if match is not None:
          break
    if match is None:
      return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers
  return found


# -- export --------------------------------------------------------------------


def _is_lora_param(x: Any) -> bool:
  return isinstance(x, LoraParam)


def _module_template(rules: PeftRules, path: str, what: str) -> str:
  template = rules(path)
  if template is None:
    raise LoraPeftError(f"'{path}': the rules give no PyTorch module name for this {what}; "
                        f"add a pattern to jlora.PeftRules (or return a name from your "
                        f"rule function)")
  if not isinstance(template, str) or not template:
    raise LoraPeftError(f"'{path}': the rules returned {template!r}, not a module name")
  return template


def _claim(owners: dict[str, str], module: str, path: str) -> None:
  prev = owners.setdefault(module, path)
  if prev != path:
    raise LoraPeftError(f"'{path}' and '{prev}' both map to PyTorch module '{module}'; "
                        f"the rules must give each parameter its own module")


def _to_numpy(x: Any, dtype: Any) -> np.ndarray:
  arr = np.asarray(jax.device_get(x))
  return arr.astype(dtype) if dtype is not None else arr


def save_peft(path: str | os.PathLike, trainable: Any, rules: RulesLike, *,
              spec: LoraSpec | None = None, use_rslora: bool | None = None,
              base_model_name_or_path: str | None = None,
              target_modules: Sequence[str] | str | None = None,
              task_type: str | None = None, dtype: Any = None,
              extra_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes ``trainable``'s adapters as a PEFT LoRA adapter folder.

  Writes ``adapter_config.json`` and ``adapter_model.safetensors`` as
  ``PeftModel.save_pretrained`` does, so that
  ``PeftModel.from_pretrained(torch_base_model, path)`` (and readers of the
  format such as vLLM) load it. Each adapted weight becomes
  ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight``
  ``(out, r)``: the transposes of jlora's ``a (in, r)`` and ``b (r, out)``, with
  multi-axis in/out axes flattened in the weight's axis order and each
  index of a stack axis (``nn.scan`` layers) written as its own module.
  Plain arrays in ``trainable`` (``LoraSpec.extra_trainable``) are written
  as PEFT ``modules_to_save`` under their PyTorch names, which requires
  every parameter of their module to be trained in full.

  ``lora_alpha`` is recovered from each ``LoraParam.scale``: ``scale * r``,
  or ``scale * sqrt(r)`` with rsLoRA. Whether rsLoRA was used is not stored
  in a ``LoraParam``; it comes from ``use_rslora``, else ``spec.use_rslora``,
  else ``False``. Either way PEFT computes the same scale; the flag only
  decides which alpha the file records. ``r``/``lora_alpha`` are the most
  common values; modules that differ go to ``rank_pattern``/``alpha_pattern``
  keyed by their escaped full module name.

  Args:
    path: folder to write (created if needed; the two files are replaced).
    trainable: the trainable tree from ``jlora.lora_transform`` (or
      ``load_peft``), possibly trained.
    rules: how parameter paths name PyTorch modules: a ``PeftRules`` or a
      function (see ``PeftRules``).
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

  Returns:
    The config written to ``adapter_config.json``.

  Raises:
    LoraPeftError: a parameter has no module name, two map to one module,
      the stack axes and the rules disagree, or the tree holds something
      PEFT's format cannot express.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile
    >>> params = {"fc": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    >>> spec = jlora.LoraSpec(rank=2, alpha=4, targets=["fc/kernel"])
    >>> frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> config = jlora.save_peft(tempfile.mkdtemp(), trainable, jlora.PeftRules(), spec=spec)
    >>> config["r"], config["lora_alpha"], config["target_modules"]
    (2, 4, ['fc'])
  """
  directory = os.fspath(path)
  rules = _as_rules(rules)
  pairs, _ = flatten_with_paths(trainable, is_leaf=_is_lora_param)
  if use_rslora is None:
    use_rslora = bool(spec.use_rslora) if spec is not None else False
  tensors: dict[str, np.ndarray] = {}
  owners: dict[str, str] = {}
  lora_modules: dict[str, tuple[int, int | float]] = {}
  lora_templates: set[str] = set()
  dropouts: list[float] = []

  for path, leaf in pairs:
    if not _is_lora_param(leaf):
      continue
    if path.rpartition("/")[2] == "embedding":
      raise LoraPeftError(
          f"'{path}': PEFT stores LoRA on an embedding as lora_embedding_A/B of an "
          f"nn.Embedding, which jlora does not export; exclude embeddings from targets")
    template = _module_template(rules, path, "adapted weight")
    layout, r = leaf.layout, leaf.rank
    n_stack = len(layout.stack_axes)
    if _n_stack(template) != n_stack:
      raise LoraPeftError(
          f"'{path}': the rules name it '{template}' with {_n_stack(template)} stack-index "
          f"field(s), but its layout {layout} has {n_stack} stack axes (one PyTorch "
          f"module per index, e.g. '{{layer}}' in a PeftRules pattern)")
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
    a, b = _to_numpy(leaf.a, dtype), _to_numpy(leaf.b, dtype)
    for idx in np.ndindex(*a.shape[:n_stack]):
      module = template.format(*idx)
      _claim(owners, module, path)
      lora_a, lora_b = _factors_to_torch(a[idx], b[idx], layout)
      tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = lora_a
      tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = lora_b
      lora_modules[module] = (r, alpha)
    lora_templates.add(template)
    dropouts.append(float(leaf.dropout))
  if not lora_modules:
    raise LoraPeftError("trainable holds no jlora.LoraParam: nothing to export")

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
                          f"add it to PeftRules.leaf_names")
    arr = _to_numpy(leaf, dtype)
    k = _n_stack(template)
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
        if not rules.is_in_out(module):
          w = w.T
      tensors[f"{KEY_PREFIX}{module}.{torch_name}"] = np.ascontiguousarray(w)
      if module not in saved:
        saved.append(module)
  for module in saved:
    for lora in lora_modules:
      if lora.startswith(module + "."):
        raise LoraPeftError(f"PyTorch module '{lora}' is adapted but lies inside "
                            f"'{module}', which is trained in full (modules_to_save)")

  r_global = collections.Counter(r for r, _ in lora_modules.values()).most_common(1)[0][0]
  alpha_global = collections.Counter(a for _, a in lora_modules.values()).most_common(1)[0][0]
  rank_pattern = {re.escape(m): r for m, (r, _) in lora_modules.items() if r != r_global}
  alpha_pattern = {re.escape(m): a for m, (_, a) in lora_modules.items() if a != alpha_global}

  # Modules the Flax tree knows of that PEFT could adapt but jlora did not.
  saved_templates = {rules(p) for p, leaf in pairs if leaf is not None and not _is_lora_param(leaf)}
  others = sorted({t for p, leaf in pairs
                   if p.rpartition("/")[2] in rules.kernel_leaves and not _is_lora_param(leaf)
                   and (t := rules(p)) is not None and t not in lora_templates
                   and t not in saved_templates})
  if target_modules is None:
    short = sorted({m.rpartition(".")[2] for m in lora_modules})
    if any(not s or s.isdigit() for s in short) or any(
        t.rpartition(".")[2] in short for t in others):
      target_modules = list(lora_modules)
    else:
      target_modules = short
  else:
    target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
    probe = {"target_modules": target_modules, "modules_to_save": saved or None}
    for m in lora_modules:
      if _peft_targets(probe, m) is False:
        raise LoraPeftError(f"target_modules {target_modules!r} does not select adapted "
                            f"module '{m}'; PEFT would ignore its weights")
    for t in others:
      m = t.format(*([0] * _n_stack(t)))
      if _peft_targets(probe, m):
        raise LoraPeftError(f"target_modules {target_modules!r} selects '{m}', which has "
                            f"no LoRA factors; PEFT would add an untrained adapter there")

  config: dict[str, Any] = {
      "alpha_pattern": alpha_pattern,
      "auto_mapping": None,
      "base_model_name_or_path": base_model_name_or_path,
      "bias": "none",
      "fan_in_fan_out": any(rules.is_in_out(m) for m in lora_modules),
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
      "use_dora": False,
      "use_rslora": bool(use_rslora),
  }
  config.update(extra_config or {})
  _check_config(config, "save_peft config")

  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    f.write(json.dumps(config, indent=2, sort_keys=True))
  save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
  return config


# -- import --------------------------------------------------------------------


class PeftAdapter(NamedTuple):
  """What ``load_peft`` returns.

  Attributes:
    frozen: the base parameters with None at the weights trained in full,
      ready for ``jlora.lora(fn)(frozen, trainable, ...)``.
    trainable: LoraParam at each adapted weight, the ``modules_to_save``
      weights, None elsewhere.
    spec: a ``LoraSpec`` describing the adapter (exact paths as targets,
      rank/alpha per path, use_rslora, dropout, layouts), which ``save_peft``
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


def _read_folder(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  if not os.path.isdir(path):
    raise LoraPeftError(f"'{path}' is not a folder (expected a PEFT adapter folder with "
                        f"{CONFIG_NAME} and {WEIGHTS_NAME})")
  cfg_file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(cfg_file):
    raise LoraPeftError(f"'{path}' has no {CONFIG_NAME}")
  try:
    with open(cfg_file) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise LoraPeftError(f"'{cfg_file}' is not valid JSON: {e}") from None
  _check_config(config, cfg_file)
  weights = os.path.join(path, WEIGHTS_NAME)
  if not os.path.isfile(weights):
    if os.path.isfile(os.path.join(path, "adapter_model.bin")):
      raise LoraPeftError(
          f"'{path}' holds adapter_model.bin, a pickle, which jlora never reads (it can "
          f"run code). Re-save it in PEFT with safe_serialization=True")
    raise LoraPeftError(f"'{path}' has no {WEIGHTS_NAME}")
  from safetensors.numpy import load_file
  try:
    tensors = load_file(weights)
  except Exception as e:  # safetensors raises its own error types
    raise LoraPeftError(f"'{weights}' is not a readable safetensors file: {e}") from None
  return config, tensors


def _parse_keys(tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], weights: str):
  lora: dict[str, dict[str, tuple[str, np.ndarray]]] = collections.defaultdict(dict)
  full: dict[tuple[str, str], tuple[str, np.ndarray]] = {}
  for key, value in tensors.items():
    if not key.startswith(KEY_PREFIX):
      raise LoraPeftError(
          f"'{weights}': key '{key}' lacks the '{KEY_PREFIX}' prefix PEFT writes; PEFT "
          f"would load such a file with every factor left at its initial value")
    rest = key[len(KEY_PREFIX):]
    m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", rest)
    if m:
      lora[m.group(1)][m.group(2)] = (key, value)
      continue
    if "lora_magnitude_vector" in rest:
      raise LoraPeftError(f"'{weights}': key '{key}' is a DoRA magnitude; DoRA adapters "
                          f"are not supported")
    if "lora_embedding_" in rest:
      raise LoraPeftError(f"'{weights}': key '{key}' is LoRA on an nn.Embedding, which "
                          f"jlora does not import")
    if re.search(r"\.lora_[AB]\.bias$", rest):
      raise LoraPeftError(f"'{weights}': key '{key}' is a LoRA bias (lora_bias=True), "
                          f"which jlora does not support")
    if ".lora_" in rest or rest.startswith("lora_"):
      raise LoraPeftError(f"'{weights}': key '{key}' is not a LoRA tensor jlora knows")
    module, _, param = rest.rpartition(".")
    if not module or not _is_saved_module(config, module):
      raise LoraPeftError(
          f"'{weights}': unexpected key '{key}': not a lora_A/lora_B weight and not in "
          f"modules_to_save {config.get('modules_to_save')!r}")
    full[(module, param)] = (key, value)
  return lora, full


class _Index:
  """Parameter paths by PyTorch module name, from the forward rule."""

  def __init__(self, pairs, rules: PeftRules):
    self.entries: list[_Entry] = []
    self.exact: dict[str, list[_Entry]] = collections.defaultdict(list)
    self.stacked: list[tuple[re.Pattern, list[int], _Entry]] = []
    for i, (path, leaf) in enumerate(pairs):
      template = rules(path)
      if template is None:
        continue
      leaf_name = path.rpartition("/")[2]
      e = _Entry(i, path, leaf, template, _n_stack(template),
                 rules.leaf_names.get(leaf_name), leaf_name in rules.kernel_leaves)
      self.entries.append(e)
      if e.n_stack:
        regex, positions = _template_regex(template)
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
    names = list(self.exact) + [e.template for _, _, e in self.stacked]
    return difflib.get_close_matches(module, names, n=3, cutoff=0.0)


def _escaped_by_length(values: Mapping[str, Any]) -> dict[str, Any]:
  # LoraSpec patterns also match '/'-aligned suffixes: try longer paths first.
  return {re.escape(p): v for p, v in sorted(values.items(), key=lambda kv: -len(kv[0]))}


def load_peft(path: str | os.PathLike, params: Any, rules: RulesLike, *,
              layouts: Mapping[str, Layout] | None = None,
              dtype: Any = None) -> PeftAdapter:
  """Reads a PEFT LoRA adapter folder into jlora factors for ``params``.

  The inverse of ``save_peft``: ``lora_A (r, in)`` and ``lora_B (out, r)``
  become ``LoraParam(a (in, r), b (r, out))`` laid out as ``layouts`` (or the
  2-D default) says, modules ``<prefix>.{i}.<name>`` of a stacked weight are
  stacked along its stack axis, and ``modules_to_save`` tensors become
  plain trainable leaves. Module names are resolved by applying ``rules`` to
  every parameter path of ``params``, so only the forward rule is needed.

  The folder is validated before anything is returned: every
  ``adapter_config.json`` option that would change the adapter's function
  and that jlora lacks (DoRA, ``bias != "none"``, a non-LoRA ``peft_type``,
  PiSSA-style inits, ...), every key that maps to no parameter, every
  module that ``target_modules`` or ``modules_to_save`` selects and the file
  lacks, every shape and rank mismatch raises ``LoraPeftError`` naming the
  key. No factor is ever left at an initial value. Only JSON and
  safetensors are read; torch is not needed.

  Args:
    path: the adapter folder.
    params: the base parameters (or the ``frozen`` tree of an earlier
      ``lora_transform``) of the Flax model that corresponds to the PyTorch
      base model.
    rules: how parameter paths name PyTorch modules (``PeftRules`` or a
      function), as for ``save_peft``.
    layouts: path -> Layout for weights that are not plain 2-D ``(in, out)``
      kernels (``jlora.infer_layouts(fn, params, *args)``); needed for
      ``nn.scan`` stacks and multi-axis kernels.
    dtype: dtype of A and B (default: as stored in the file).

  Returns:
    ``PeftAdapter(frozen, trainable, spec, config)``.

  Raises:
    LoraPeftError: the folder is not an adapter jlora can load faithfully.
    LoraLayoutError: an adapted weight has no layout.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile
    >>> params = {"fc": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    >>> spec = jlora.LoraSpec(rank=2, alpha=4, targets=["fc/kernel"])
    >>> _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    >>> folder = tempfile.mkdtemp()
    >>> _ = jlora.save_peft(folder, trainable, jlora.PeftRules())
    >>> adapter = jlora.load_peft(folder, params, jlora.PeftRules())
    >>> adapter.trainable["fc"]["kernel"].a.shape, adapter.spec.scale_for("fc/kernel")
    ((8, 2), 2.0)
  """
  directory = os.fspath(path)
  rules = _as_rules(rules)
  config, tensors = _read_folder(directory)
  weights = os.path.join(directory, WEIGHTS_NAME)
  lora, full = _parse_keys(tensors, config, weights)
  if not lora:
    raise LoraPeftError(f"'{weights}' holds no lora_A/lora_B tensors")
  pairs, treedef = flatten_with_paths(params)
  index = _Index(pairs, rules)

  found = _match_lora_modules(lora, index, config, weights)
  factors = {i: _assemble_factors(entry, by_idx, layouts, weights)
             for i, (entry, by_idx) in found.items()}
  _check_targets_covered(index, found, config, weights)
  extras = _load_full_weights(full, index, found, config, rules, weights)

  factor_dtype = jnp.dtype(dtype if dtype is not None else
                           next(iter(factors.values()))[1].dtype)
  spec = _spec_of(config, {pairs[i][0]: f for i, f in factors.items()},
                  sorted(pairs[i][0] for i in extras), factor_dtype,
                  os.path.join(directory, CONFIG_NAME))
  frozen = [leaf for _, leaf in pairs]
  trainable: list[Any] = [None] * len(pairs)
  for i, (layout, a, b, _, _) in factors.items():
    trainable[i] = LoraParam(a=jnp.asarray(a, factor_dtype), b=jnp.asarray(b, factor_dtype),
                             scale=spec.scale_for(pairs[i][0]), layout=layout,
                             dropout=float(spec.dropout))
  for i, value in extras.items():
    trainable[i], frozen[i] = value, None
  return PeftAdapter(treedef.unflatten(frozen), treedef.unflatten(trainable), spec,
                     dict(config))


# A LoRA module found in the file: (key of lora_A, lora_A, lora_B, rank, alpha).
_Found = tuple[str, np.ndarray, np.ndarray, int, Any]


def _match_lora_modules(lora, index: _Index, config, weights: str
                        ) -> dict[int, tuple[_Entry, dict[tuple[int, ...], _Found]]]:
  """Each file module -> the kernel it adapts (leaf index) and stack index."""
  found: dict[int, tuple[_Entry, dict[tuple[int, ...], _Found]]] = {}
  for module, parts in lora.items():
    for half in "AB":
      if half not in parts:
        other = parts["B" if half == "A" else "A"][0]
        raise LoraPeftError(f"'{weights}': '{other}' has no partner "
                            f"'{KEY_PREFIX}{module}.lora_{half}.weight'")
    (key_a, lora_a), (key_b, lora_b) = parts["A"], parts["B"]
    hits = [(e, i) for e, i in index.find(module) if e.is_kernel]
    if not hits:
      raise LoraPeftError(
          f"'{weights}': key '{key_a}' is for PyTorch module '{module}', which no "
          f"parameter maps to under these rules (nearest module names: "
          f"{index.near(module)})")
    if len(hits) > 1:
      raise LoraPeftError(f"'{weights}': module '{module}' maps to several parameters: "
                          f"{[e.path for e, _ in hits]}")
    e, idx = hits[0]
    if e.leaf is None:
      raise LoraPeftError(f"'{e.path}' (PyTorch module '{module}') is None in params; "
                          f"pass the base parameters")
    if _peft_targets(config, module) is False:
      raise LoraPeftError(
          f"'{weights}': key '{key_a}' is for module '{module}', which target_modules "
          f"{config.get('target_modules')!r} does not select; PEFT would ignore it")
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
      raise LoraPeftError(f"'{weights}': '{key_a}' {lora_a.shape} and '{key_b}' "
                          f"{lora_b.shape} are not (r, in) and (out, r)")
    r = lora_a.shape[0]
    want_r = _pattern_value(config.get("rank_pattern"), module, config["r"])
    if r != want_r:
      raise LoraPeftError(f"'{weights}': '{key_a}' has rank {r} but adapter_config.json "
                          f"gives module '{module}' rank {want_r}")
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    found.setdefault(e.index, (e, {}))[1][idx] = (key_a, lora_a, lora_b, r, alpha)
  return found


def _assemble_factors(e: _Entry, by_idx: Mapping[tuple[int, ...], _Found],
                      layouts: Mapping[str, Layout] | None, weights: str):
  """One kernel's ``(layout, a, b, rank, alpha)`` from its modules' tensors."""
  shape = tuple(e.leaf.shape)
  layout = resolve_layout(e.path, e.leaf, LoraSpec(), layouts)
  if len(layout.stack_axes) != e.n_stack:
    raise LoraPeftError(
        f"'{e.path}': the rules name it '{e.template}' with {e.n_stack} stack "
        f"index(es), but its layout {layout} has {len(layout.stack_axes)} stack axes")
  stack_shape = tuple(shape[ax] for ax in layout.stack_axes)
  want = set(np.ndindex(*stack_shape))
  beyond = sorted(set(by_idx) - want)
  if beyond:
    raise LoraPeftError(f"'{weights}': key '{by_idx[beyond[0]][0]}' is beyond the stack "
                        f"of '{e.path}' (stack shape {stack_shape})")
  missing = sorted(want - set(by_idx))
  if missing:
    names = [e.template.format(*m) for m in missing[:3]]
    raise LoraPeftError(
        f"'{weights}': missing keys '{KEY_PREFIX}{names[0]}.lora_A.weight' / "
        f"'.lora_B.weight' ({len(missing)} module(s) of stacked '{e.path}': {names}); "
        f"jlora never leaves a factor at its initial value")
  settings = {(v[3], v[4]) for v in by_idx.values()}
  if len(settings) > 1:
    raise LoraPeftError(
        f"'{weights}': the modules of stacked '{e.path}' have different (rank, alpha) "
        f"{sorted(settings)}; jlora keeps one rank and scale per stacked weight")
  # Each slice's layout: the weight's axes renumbered without the stack axes.
  rest = [ax for ax in range(len(shape)) if ax not in layout.stack_axes]
  slice_shape = tuple(shape[ax] for ax in rest)
  slice_layout = Layout(tuple(rest.index(ax) for ax in layout.in_axes),
                        tuple(rest.index(ax) for ax in layout.out_axes))
  fan_in, fan_out = layout.fan_in(shape), layout.fan_out(shape)
  a_parts, b_parts = [], []
  for idx in sorted(by_idx):
    key_a, lora_a, lora_b, r, _ = by_idx[idx]
    if lora_a.shape[1] != fan_in or lora_b.shape[0] != fan_out:
      raise LoraPeftError(
          f"'{weights}': '{key_a}' {lora_a.shape} and its lora_B {lora_b.shape} do not "
          f"fit '{e.path}' {shape} with layout {layout}: expected ({r}, {fan_in}) and "
          f"({fan_out}, {r})")
    a, b = _factors_from_torch(lora_a, lora_b, slice_layout, slice_shape)
    a_parts.append(a)
    b_parts.append(b)
  a = np.stack(a_parts).reshape(stack_shape + a_parts[0].shape)
  b = np.stack(b_parts).reshape(stack_shape + b_parts[0].shape)
  r, alpha = next(iter(settings))
  return layout, a, b, r, alpha


def _check_targets_covered(index: _Index, found, config, weights: str) -> None:
  """Every module the config targets must have its factors in the file."""
  for e in index.entries:
    if not e.is_kernel or e.leaf is None or e.index in found:
      continue
    module = e.template.format(*([0] * e.n_stack))
    if _peft_targets(config, module) and not _is_saved_module(config, module):
      raise LoraPeftError(
          f"'{weights}': no lora_A/lora_B for module '{module}' (parameter '{e.path}'), "
          f"which target_modules {config.get('target_modules')!r} selects; PEFT would "
          f"leave it untrained, jlora refuses")


def _load_full_weights(full, index: _Index, found, config, rules: PeftRules,
                       weights: str) -> dict[int, jax.Array]:
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
      if not rules.is_in_out(module):
        value = value.T
    parts[e.index][idx] = (key, value)
  # A saved module comes whole: each of its parameters must be in the file.
  saved_templates = {entries[i].template for i in parts}
  for e in index.entries:
    if e.leaf is None or e.index in parts or e.index in found:
      continue
    module = e.template.format(*([0] * e.n_stack))
    if e.template in saved_templates or _is_saved_module(config, module):
      raise LoraPeftError(
          f"'{weights}': no '{KEY_PREFIX}{module}.{e.torch_name}' for '{e.path}', although "
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
        rank_pattern=_escaped_by_length({p: r for p, r in ranks.items() if r != r_global}),
        alpha_pattern=_escaped_by_length(
            {p: a for p, a in alphas.items() if a != alpha_global}),
        use_rslora=bool(config.get("use_rslora", False)),
        dropout=float(config.get("lora_dropout") or 0.0), dtype=dtype,
        extra_trainable="|".join(re.escape(p) for p in extras) if extras else None,
        layouts=_escaped_by_length(layouts))
  except LoraSpecError as err:
    raise LoraPeftError(f"'{where}': {err}") from None

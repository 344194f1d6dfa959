"""PEFT adapter folders: export jlora adapters to PyTorch PEFT, import PEFT's.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and
``adapter_model.safetensors`` (see ``jlora.peft.names``), the format Hugging
Face PEFT, vLLM, LoRAX, MaxText and levanter read. Flax names parameters by
path (``transformer/h/0/attn/c_attn/kernel``), PyTorch by module
(``transformer.h.0.attn.c_attn``): a ``Rules`` (or a plain function) says
how one becomes the other, and weights that ``nn.scan`` stacks along a layer
axis become one PyTorch module per layer.

* ``save(path, trainable, rules, ...)``: writes a folder PEFT loads;
* ``load(path, params, rules, ...)``: reads one into jlora factors (an
  ``Adapter``);
* ``describe(path)``: what a folder holds, as a dict (``jlora inspect``);
* ``save_bank`` / ``load_bank`` / ``describe_bank``: several adapters in
  PEFT's multi-adapter layout (a subfolder per adapter), as a bank.

The modules: ``names`` (file names and keys), ``rules`` (``Rules``), ``config``
(what jlora refuses, PEFT's matching), ``axes`` (factor axes to and from
PyTorch), ``kinds`` (linear, conv, embedding, target_parameters), ``mark``
(checksums of a folder jlora wrote), ``export`` (``save``), ``load`` (``load``,
in steps: ``folder`` reads the folder, ``match`` finds each module's
parameter, ``assemble`` builds the factors and the spec, ``checks`` holds the
file to the config and the base, ``full_weights`` reads ``modules_to_save``),
``describe`` and ``bank``; ``tunix`` (``Rules.tunix``: google-tunix's Llama 3, Qwen 3,
Gemma 3) and ``fused`` (one Flax kernel that is several PyTorch modules).

Example:
  >>> import jax, jax.numpy as jnp, jlora, tempfile
  >>> params = {"fc": {"kernel": jnp.ones((8, 4))}}
  >>> spec = jlora.LoraSpec(rank=2, alpha=4, targets=["fc/kernel"])
  >>> _, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
  >>> folder = tempfile.mkdtemp()
  >>> jlora.peft.save(folder, trainable, jlora.peft.Rules(), spec=spec)["target_modules"]
  ['fc']
  >>> jlora.peft.load(folder, params, jlora.peft.Rules()).spec.rank
  2
"""

from jlora.peft.bank import Bank, describe_bank, is_bank, load_bank, save_bank
from jlora.peft.describe import describe, is_adapter
from jlora.peft.export import save
from jlora.peft.load import Adapter, load
from jlora.peft.rules import Rules

__all__ = ["Adapter", "Bank", "Rules", "describe", "describe_bank", "is_adapter", "is_bank",
           "load", "load_bank", "save", "save_bank"]

# 0.1's names of this namespace (save_peft, PeftRules, ...), forwarded with a
# DeprecationWarning until 0.3 (jlora._deprecated); not in __all__ or dir().
from jlora import _deprecated  # noqa: E402  (needs jlora.peft.rules, imported above)

__getattr__ = _deprecated.module_getattr(__name__, _deprecated.PEFT)

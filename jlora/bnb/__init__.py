"""Hugging Face bitsandbytes 4-bit checkpoints (``*-bnb-4bit``): ``jlora.bnb``.

transformers saves a model loaded with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`` as safetensors in which each quantized
``nn.Linear`` (PyTorch module ``M``) has these entries, written by
bitsandbytes' ``QuantState.as_dict(packed=True)``:

* ``M.weight``: the 4-bit codes of the ``(out, in)`` weight flattened
  row-major, two per byte, ``(ceil(n / 2), 1)`` uint8 (the same bytes in
  another dtype with ``bnb_4bit_quant_storage``);
* ``M.weight.absmax``: one value per block of ``blocksize``: float32, or with
  double quantization uint8 codes of ``absmax - offset``;
* ``M.weight.quant_map``: the 16 NF4 values (float32);
* with double quantization, ``M.weight.nested_absmax`` (float32, one per 256
  absmax codes) and ``M.weight.nested_quant_map`` (the 256 values of
  bitsandbytes' signed dynamic map);
* ``M.weight.quant_state.bitsandbytes__nf4``: JSON as uint8 bytes:
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` (``[out, in]``), and
  with double quantization ``nested_blocksize`` (256), ``nested_dtype`` and
  ``nested_offset`` (the float32 offset).

Every other tensor (embeddings, norms, an unquantized ``lm_head``, biases) is
stored as PyTorch holds it. A large checkpoint is split into shards listed by
``model.safetensors.index.json``.

These are the arrays of a ``jlora.NF4Array`` (see ``jlora.quant.nf4``): a
Flax ``(in, out)`` kernel of layout ``Layout((0,), (1,))`` is stored exactly
as bitsandbytes stores the transposed PyTorch weight, and an ``nn.scan``
stack holds the per-layer arrays stacked on its stack axis. So ``load`` uses
the file's bytes as they are, and ``save`` writes a file transformers loads
as it loads its own.

Names: a ``jlora.peft.Rules`` maps each parameter path to a PyTorch module
(``Rules.llama()``: ``model/layers/0/self_attn/q_proj/kernel`` <->
``model.layers.0.self_attn.q_proj``), its leaf names to PyTorch parameter
names (``kernel`` -> ``weight``), and says how Flax stores its 2-D kernels;
stacked weights are one module per stack index (``Rules.scanned``).

Only JSON and safetensors are read: nothing is unpickled and no code from a
file runs. What jlora cannot read faithfully is refused with one line naming
the entry: FP4 or 8-bit weights, a quant state it does not know, tables that
are not NF4's, shapes that do not fit, missing or unexpected entries.

* ``load(path, like, rules, ...)``: reads a checkpoint into Flax parameters,
  ``NF4Array`` leaves for the quantized weights;
* ``save(path, params, rules, ...)``: writes one transformers loads;
* ``describe(path)``: what a checkpoint holds, as a dict (``jlora inspect``);
* ``is_checkpoint`` / ``is_owned``: whether a path is one / one jlora wrote;
* ``is_quant_state_key``: whether an entry is a 4-bit quant state.

The modules: ``files`` (the safetensors files and jlora's mark on them),
``quant_state`` (the quant states and the arrays they describe), ``mapping``
(parameter paths to PyTorch names, kernels to ``(out, in)`` weights),
``load``, ``save`` and ``describe``.

Example:
  >>> import tempfile, jax.numpy as jnp, jlora
  >>> params = jlora.quantize({"fc": {"kernel": jnp.ones((128, 64))}})
  >>> f = jlora.bnb.save(f"{tempfile.mkdtemp()}/model.safetensors", params, jlora.peft.Rules())
  >>> is_checkpoint(f), is_owned(f)
  (True, True)
  >>> load(f, params, jlora.peft.Rules())["fc"]["kernel"].shape
  (128, 64)
"""

from jlora.bnb.describe import describe, is_checkpoint
from jlora.bnb.files import is_owned
from jlora.bnb.load import load
from jlora.bnb.save import save
from jlora.quant.nf4_files import is_quant_state_key

__all__ = ["describe", "is_checkpoint", "is_owned", "is_quant_state_key", "load", "save"]

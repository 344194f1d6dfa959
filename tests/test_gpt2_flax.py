"""The Flax GPT-2 in gpt2_flax.py computes the same logits as transformers' GPT2LMHeadModel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_flax import (
    GPT2LMHeadModel,
    config_from_hf,
    make_tiny_torch_gpt2,
    params_from_torch,
    peft_module_name,
)
from lazy import lazy

torch = lazy("torch")


@pytest.fixture(autouse=True, scope="module")
def _needs_torch():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def torch_model():
    return make_tiny_torch_gpt2(seed=0)


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def test_tiny_model_settings(torch_model):
    cfg = torch_model.config
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size, cfg.n_positions) == (64, 2, 4, 128, 64)
    assert not torch_model.training
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0
    assert all(p.dtype == torch.float32 for p in torch_model.parameters())


def test_params_match_flax_init_structure(torch_model):
    """Converted params have exactly the tree structure and shapes of Flax's own init."""
    cfg = config_from_hf(torch_model.config)
    model = GPT2LMHeadModel(cfg)
    init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    conv = params_from_torch(torch_model.state_dict())
    shapes = lambda t: jax.tree_util.tree_map(jnp.shape, t)  # noqa: E731
    assert shapes(conv) == shapes(init)
    # Conv1D layout (in, out) is kept.
    d = cfg.n_embd
    blk = conv["transformer"]["h"]["0"]
    assert blk["attn"]["c_attn"]["kernel"].shape == (d, 3 * d)
    assert blk["mlp"]["c_fc"]["kernel"].shape == (d, 4 * d)
    assert blk["mlp"]["c_proj"]["kernel"].shape == (4 * d, d)


def test_kernel_paths_map_to_torch_module_names(torch_model):
    conv = params_from_torch(torch_model.state_dict())
    torch_modules = dict(torch_model.named_modules())
    sd = torch_model.state_dict()
    leaves = jax.tree_util.tree_leaves_with_path(conv)
    kernels = [(p, x) for p, x in leaves if p[-1].key == "kernel"]
    assert len(kernels) == 4 * torch_model.config.n_layer
    for path, x in kernels:
        name = peft_module_name(path)
        assert type(torch_modules[name]).__name__ == "Conv1D", name
        np.testing.assert_array_equal(np.asarray(x), sd[name + ".weight"].numpy())
    assert peft_module_name("transformer/h/0/attn/c_attn/kernel") == "transformer.h.0.attn.c_attn"


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_torch(seed):
    tm = make_tiny_torch_gpt2(seed=seed)
    model = GPT2LMHeadModel(config_from_hf(tm.config))
    params = params_from_torch(tm.state_dict())
    ids = np.random.default_rng(seed).integers(0, tm.config.vocab_size, size=(2, 16), dtype=np.int64)
    expected = _torch_logits(tm, ids)
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32)))
    assert got.shape == expected.shape == (2, 16, 128)
    err = np.max(np.abs(got - expected))
    assert err < 1e-4, err
    # Sanity: the comparison is not trivially satisfied.
    assert np.std(expected) > 0.05


def test_params_from_torch_rejects_unknown_keys(torch_model):
    sd = dict(torch_model.state_dict())
    sd["transformer.h.0.attn.q_attn.weight"] = sd["transformer.h.0.attn.c_proj.weight"]
    with pytest.raises(KeyError):
        params_from_torch(sd)

"""The CLIP text tower against OpenCLIP's own ``TextTransformer`` (open_clip is in the
``torch`` extra): the same weights give the same text features (causal mask, pre-LN
blocks, exact GELU, argmax pooling at the end-of-text token, the projection), and the
parameter count is OpenCLIP's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.models import clip as clip_model

W, HEADS, LAYERS, VOCAB, CTX, OUT = 16, 2, 2, 30, 7, 6


def _torch_text_tower():
  torch = pytest.importorskip("torch")
  transformer = pytest.importorskip("open_clip.transformer")
  torch.manual_seed(0)
  tower = transformer.TextTransformer(context_length=CTX, vocab_size=VOCAB, width=W,
                                      heads=HEADS, layers=LAYERS, output_dim=OUT)
  tower.init_parameters()
  with torch.no_grad():  # biases and LayerNorm affines are 0/1 at init: make them matter
    for name, p in tower.named_parameters():
      if name.endswith("bias") or ".ln_" in name or name.startswith("ln_final"):
        p.add_(0.1 * torch.randn_like(p))
  return torch, tower.eval()


def _flax_params(tower):
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in tower.state_dict().items()}
  hd = W // HEADS
  proj = sd["text_projection"] if "text_projection" in sd else sd["text_projection.weight"].T
  params = {"token_embedding": {"embedding": sd["token_embedding.weight"]},
            "positional_embedding": sd["positional_embedding"],
            "ln_final": {"scale": sd["ln_final.weight"], "bias": sd["ln_final.bias"]},
            "text_projection": proj}
  for i in range(LAYERS):
    p = f"transformer.resblocks.{i}."
    w_in, b_in = sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]
    attn = {}
    for j, name in enumerate(("query", "key", "value")):
      attn[name] = {"kernel": w_in[j * W:(j + 1) * W].T.reshape(W, HEADS, hd),
                    "bias": b_in[j * W:(j + 1) * W].reshape(HEADS, hd)}
    attn["out"] = {"kernel": sd[p + "attn.out_proj.weight"].T.reshape(HEADS, hd, W),
                   "bias": sd[p + "attn.out_proj.bias"]}
    params[f"resblocks_{i}"] = {
        "ln_1": {"scale": sd[p + "ln_1.weight"], "bias": sd[p + "ln_1.bias"]},
        "attn": attn,
        "ln_2": {"scale": sd[p + "ln_2.weight"], "bias": sd[p + "ln_2.bias"]},
        "c_fc": {"kernel": sd[p + "mlp.c_fc.weight"].T, "bias": sd[p + "mlp.c_fc.bias"]},
        "c_proj": {"kernel": sd[p + "mlp.c_proj.weight"].T, "bias": sd[p + "mlp.c_proj.bias"]},
    }
  return params


def test_text_tower_matches_open_clip():
  torch, tower = _torch_text_tower()
  ours = clip_model.TextTransformer(vocab_size=VOCAB, context_length=CTX, width=W,
                                    layers=LAYERS, heads=HEADS, embed_dim=OUT)
  # sequences of different lengths: start, words, end-of-text (the largest id), padding
  tokens = np.array([[VOCAB - 2, 3, 7, VOCAB - 1, 0, 0, 0],
                     [VOCAB - 2, 5, VOCAB - 1, 0, 0, 0, 0],
                     [VOCAB - 2, 1, 2, 4, 8, 9, VOCAB - 1]], np.int32)
  template = jax.eval_shape(ours.init, jax.random.PRNGKey(0), jnp.asarray(tokens))["params"]
  params = _flax_params(tower)
  assert jax.tree.structure(template) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(params)):
    assert a.shape == b.shape
  n_ours = sum(x.size for x in jax.tree.leaves(template))
  assert n_ours == sum(p.numel() for p in tower.parameters())
  got, aux = ours.apply({"params": params}, jnp.asarray(tokens))
  with torch.no_grad():
    want = tower(torch.from_numpy(tokens.astype(np.int64))).numpy()
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # the causal mask: tokens after the end-of-text token do not change the features
  changed = tokens.copy()
  changed[0, 4:] = [11, 12, 13]
  again, _ = ours.apply({"params": params}, jnp.asarray(changed))
  np.testing.assert_allclose(np.asarray(again)[0], np.asarray(got)[0], rtol=1e-6, atol=1e-6)
  assert aux["pooled"].shape == (3, W)

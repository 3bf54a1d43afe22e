"""ToCo's PAR in JAX against NumPy loops and a torch version written here from ToCo's formulas."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.methods import apc_par as P

# (dy, dx) of ToCo's 8 kernel taps, written out again for the loops below.
_TAPS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _image(seed, shape=(2, 9, 11, 3)):
  """Piecewise-constant colour blobs plus noise, 0..255 (edges make the affinity matter)."""
  rng = np.random.default_rng(seed)
  b_, h, w, c_ = shape
  img = np.zeros(shape, np.float32)
  for b in range(b_):
    for _ in range(3):
      y0, x0 = rng.integers(0, h), rng.integers(0, w)
      img[b, y0:y0 + h // 2, x0:x0 + w // 2] += rng.uniform(0, 150, c_)
  return (img + rng.uniform(0, 40, shape)).astype(np.float32)


def _bf_neighbors(x, dilations):
  b_, h, w, c_ = x.shape
  out = np.zeros((b_, h, w, c_, 8 * len(dilations)), x.dtype)
  for b in range(b_):
    for i in range(h):
      for j in range(w):
        k = 0
        for d in dilations:
          for dy, dx in _TAPS:
            ii = min(max(i + d * dy, 0), h - 1)
            jj = min(max(j + d * dx, 0), w - 1)
            out[b, i, j, :, k] = x[b, ii, jj, :]
            k += 1
  return out


def _bf_affinity(img, dilations, w1=0.3, w2=0.01):
  b_, h, w, c_ = img.shape
  nbr = _bf_neighbors(img.astype(np.float64), dilations)
  kk = nbr.shape[-1]
  dist = []
  for d in dilations:
    for dy, dx in _TAPS:
      dist.append(d * (math.sqrt(2) if dy and dx else 1.0))
  dmean = sum(dist) / kk
  dstd = math.sqrt(sum((v - dmean) ** 2 for v in dist) / (kk - 1))
  pos = [-(v / (dstd + 1e-8) / w1) ** 2 for v in dist]
  pmax = max(pos)
  pos_soft = [math.exp(v - pmax) / sum(math.exp(u - pmax) for u in pos) for v in pos]
  aff = np.zeros((b_, h, w, kk))
  for b in range(b_):
    for i in range(h):
      for j in range(w):
        logits = [0.0] * kk
        for c in range(c_):
          vals = nbr[b, i, j, c]
          mean = sum(vals) / kk
          std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (kk - 1))
          for k in range(kk):
            logits[k] += -(abs(vals[k] - img[b, i, j, c]) / (std + 1e-8) / w1) ** 2 / c_
        m = max(logits)
        z = sum(math.exp(v - m) for v in logits)
        for k in range(kk):
          aff[b, i, j, k] = math.exp(logits[k] - m) / z + w2 * pos_soft[k]
  return aff


# --------------------------------------------------------------------------- torch version
def _torch_par(torch, imgs, masks, dilations=(1, 2, 4, 8, 12, 24), num_iter=10,
               w1=0.3, w2=0.01):
  """ToCo's PAR.forward from its formulas (NCHW): replicate-padded dilated neighbours,
  unbiased std, softmax over the neighbour dim, unnormalised sum with w2 * position."""
  F = torch.nn.functional

  def neighbours(x):
    _, _, h, w = x.shape
    out = []
    for d in dilations:
      pad = F.pad(x, [d] * 4, mode="replicate")
      for dy, dx in _TAPS:
        out.append(pad[:, :, d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w])
    return torch.stack(out, dim=2)

  masks = F.interpolate(masks, size=imgs.shape[-2:], mode="bilinear", align_corners=True)
  b, _, h, w = imgs.shape
  n = neighbours(imgs)
  dist = torch.tensor([d * (math.sqrt(2) if dy and dx else 1.0)
                       for d in dilations for dy, dx in _TAPS], dtype=imgs.dtype)
  pos = dist.reshape(1, 1, -1, 1, 1).repeat(b, 1, 1, h, w)
  aff = -(torch.abs(n - imgs.unsqueeze(2)) / (torch.std(n, dim=2, keepdim=True) + 1e-8)
          / w1) ** 2
  aff = aff.mean(dim=1, keepdim=True)
  pos_aff = -(pos / (torch.std(pos, dim=2, keepdim=True) + 1e-8) / w1) ** 2
  aff = F.softmax(aff, dim=2) + w2 * F.softmax(pos_aff, dim=2)
  for _ in range(num_iter):
    masks = (neighbours(masks) * aff).sum(2)
  return masks, aff


def _torch_refine(torch, images, cams, cls_labels, high, low, ignore, img_box, down_scale=2):
  """ToCo's refine_cams_with_bkg_v2 / _refine_cams from their formulas (NCHW, loops)."""
  F = torch.nn.functional
  b, _, h, w = images.shape
  small = [h // down_scale, w // down_scale]
  _images = F.interpolate(images, size=small, mode="bilinear", align_corners=False)
  labels_bkg = torch.cat([torch.ones(b, 1), cls_labels], dim=1)
  out = {}
  for name, thr in (("h", high), ("l", low)):
    with_bkg = torch.cat([torch.full((b, 1, h, w), thr), cams], dim=1)
    with_bkg = F.interpolate(with_bkg, size=small, mode="bilinear", align_corners=False)
    label = torch.full((b, h, w), float(ignore))
    for idx in range(b):
      key = torch.nonzero(labels_bkg[idx])[:, 0]
      valid = with_bkg[idx, key].unsqueeze(0).softmax(dim=1)
      refined, _ = _torch_par(torch, _images[[idx]], valid)
      refined = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)
      lab = key[refined.argmax(dim=1)]
      y0, y1, x0, x1 = img_box[idx]
      label[idx, y0:y1, x0:x1] = lab[0, y0:y1, x0:x1].float()
    out[name] = label
  result = out["h"].clone()
  result[out["h"] == 0] = ignore
  result[(out["h"] + out["l"]) == 0] = 0
  return result.long().numpy()


# --------------------------------------------------------------------------- tests
def test_dilated_neighbors_match_clamped_loops():
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  for dil in [(1,), (1, 2, 4, 8, 12, 24), (3, 1)]:
    got = np.asarray(P.dilated_neighbors(x, dil))
    np.testing.assert_array_equal(got, _bf_neighbors(x, dil))


def test_neighbor_distances():
  d = P.neighbor_distances((1, 4))
  r2 = math.sqrt(2)
  np.testing.assert_allclose(d, [r2, 1, r2, 1, 1, r2, 1, r2] + [4 * v for v in
                                                                 [r2, 1, r2, 1, 1, r2, 1, r2]],
                             rtol=1e-7)


@pytest.mark.parametrize("dil", [(1, 2, 4, 8, 12, 24), (1, 3)])
def test_par_affinity_matches_loops_and_sums_to_1_01(dil):
  img = _image(1, (2, 6, 7, 3))
  aff = np.asarray(P.par_affinity(img, dilations=dil))
  np.testing.assert_allclose(aff, _bf_affinity(img, dil), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(aff.sum(-1), 1.01, atol=1e-6)
  normed = np.asarray(P.par_affinity(img, dilations=dil, normalize=True))
  np.testing.assert_allclose(normed.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(normed, aff / aff.sum(-1, keepdims=True), rtol=1e-6)
  # The colour term is not flat: edges change the weights (else the test could not fail).
  assert aff.std(-1).max() > 0.01


def test_par_refine_matches_torch_version():
  torch = pytest.importorskip("torch")
  img = _image(2, (2, 14, 17, 3))
  rng = np.random.default_rng(3)
  masks = rng.uniform(0, 1, (2, 5, 6, 4)).astype(np.float32)  # upsampled inside PAR
  ref, ref_aff = _torch_par(torch, torch.tensor(img.transpose(0, 3, 1, 2)),
                            torch.tensor(masks.transpose(0, 3, 1, 2)))
  got = np.asarray(jax.jit(P.par_refine)(img, masks))
  np.testing.assert_allclose(got, ref.numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(P.par_affinity(img)),
                             ref_aff[:, 0].numpy().transpose(0, 2, 3, 1), atol=1e-6)
  np.testing.assert_allclose(ref_aff.sum(2).numpy(), 1.01, atol=1e-6)
  # Refinement moved the maps (an identity PAR would fail the comparison above too).
  assert np.abs(got - np.asarray(P.par_refine(img, masks, num_iter=0)) / 1.0).max() > 0.05


def test_par_refine_growth_and_normalize_switch():
  img = _image(4, (1, 10, 12, 3))
  ones = np.ones((1, 10, 12, 2), np.float32)
  np.testing.assert_allclose(np.asarray(P.par_refine(img, ones)), 1.01 ** 10, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(P.par_refine(img, ones, normalize=True)), 1.0,
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(P.par_refine(img, ones, num_iter=3)), 1.01 ** 3,
                             rtol=1e-5)


def test_par_refine_is_under_stop_gradient():
  img = _image(5, (1, 8, 8, 3))
  masks = np.random.default_rng(6).uniform(size=(1, 4, 4, 2)).astype(np.float32)
  g_img, g_masks = jax.grad(lambda i, m: jnp.sum(P.par_refine(i, m) ** 2), argnums=(0, 1))(
      img, masks)
  assert np.all(np.asarray(g_img) == 0) and np.all(np.asarray(g_masks) == 0)


def _refine_inputs(seed, b_=2, h=16, w=20, c_=4):
  rng = np.random.default_rng(seed)
  img = _image(seed, (b_, h, w, 3))
  # Smooth CAMs: bilinear blow-up of a coarse random grid, scaled per class.
  coarse = (rng.uniform(0, 1, (b_, 3, 4, c_)) ** 2).astype(np.float32)
  cams = np.asarray(jax.image.resize(coarse, (b_, h, w, c_), "linear"))
  cls = np.zeros((b_, c_), np.float32)
  cls[0, [1, 3]] = 1
  cls[1, [0]] = 1
  valid_cam = cams * cls[:, None, None, :] * 1.5
  valid_cam[:, :, :w // 3] *= 0.1  # a confident-background strip
  box = np.array([[0, h, 0, w], [2, h - 3, 1, w - 4]], np.int32)
  return img, valid_cam.astype(np.float32), cls, box


def test_refine_cams_with_bkg_matches_torch_version():
  torch = pytest.importorskip("torch")
  img, cams, cls, box = _refine_inputs(7)
  got = np.asarray(jax.jit(P.refine_cams_with_bkg, static_argnames=(
      "high_thre", "low_thre"))(img, cams, cls, high_thre=0.7, low_thre=0.25, img_box=box))
  ref = _torch_refine(torch, torch.tensor(img.transpose(0, 3, 1, 2)),
                      torch.tensor(cams.transpose(0, 3, 1, 2)), torch.tensor(cls), 0.7, 0.25,
                      255, box)
  np.testing.assert_array_equal(got, ref)
  values = set(np.unique(ref))
  assert {0, 255} <= values and values - {0, 255}, values  # bg, ignore and classes
  assert set(np.unique(got[0])) <= {0, 255, 2, 4} and set(np.unique(got[1])) <= {0, 255, 1}
  # Outside the box: ignore.
  assert np.all(got[1, :2] == 255) and np.all(got[1, :, -4:] == 255)


def test_refine_cams_with_bkg_without_box_is_the_full_box():
  img, cams, cls, _ = _refine_inputs(8)
  full = np.array([[0, 16, 0, 20]] * 2, np.int32)
  a = np.asarray(P.refine_cams_with_bkg(img, cams, cls, high_thre=0.7, low_thre=0.25))
  b = np.asarray(P.refine_cams_with_bkg(img, cams, cls, high_thre=0.7, low_thre=0.25,
                                        img_box=full))
  np.testing.assert_array_equal(a, b)


def test_par_bad_arguments_raise():
  img = _image(9, (1, 8, 8, 3))
  with pytest.raises(ValueError, match="dilations"):
    P.par_affinity(img, dilations=())
  with pytest.raises(ValueError, match="dilations"):
    P.dilated_neighbors(img, (0, 1))
  with pytest.raises(ValueError, match="num_iter"):
    P.par_refine(img, img, num_iter=-1)
  with pytest.raises(ValueError, match="masks"):
    P.par_refine(img, img[0])
  cams = np.zeros((1, 8, 8, 2), np.float32)
  with pytest.raises(ValueError, match="cls_labels"):
    P.refine_cams_with_bkg(img, cams, np.ones((1, 3)), high_thre=0.7, low_thre=0.2)
  with pytest.raises(ValueError, match="down_scale"):
    P.refine_cams_with_bkg(img, cams, np.ones((1, 2)), high_thre=0.7, low_thre=0.2,
                           down_scale=0)
  with pytest.raises(ValueError, match="img_box"):
    P.refine_cams_with_bkg(img, cams, np.ones((1, 2)), high_thre=0.7, low_thre=0.2,
                           img_box=np.zeros((1, 2), np.int32))

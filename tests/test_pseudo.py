"Plain tests for multiminer.metrics and multiminer.pseudo (the notebooks 07a_metrics and 07_pseudo_labels hold more)."
import numpy as np, pytest, torch
import torch.nn.functional as F
from PIL import Image

from multiminer.metrics import confusion_matrix, iou_per_class, miou, pixel_accuracy, recall_per_class
from multiminer.pseudo import pseudo_masks, pseudo_probs, load_saliency, dense_crf, crf_refine

# ---------------------------------------------------------------- metrics
def test_confusion_matrix_by_hand_and_orientation():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]   # rows = ground truth
    assert recall_per_class(conf).tolist() == [0.5, 0.5, 1.0]
    assert recall_per_class(conf.T).tolist() != recall_per_class(conf).tolist()
    assert iou_per_class(conf).tolist() == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert miou(conf) == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3 * 100)
    assert pixel_accuracy(conf) == pytest.approx(60.0)

def test_ignored_pixels_are_not_counted():
    target = torch.full((4, 4), 255); target[0, 0] = 1
    pred = torch.zeros(4, 4, dtype=torch.long); pred[0, 0] = 1
    conf = confusion_matrix(pred, target, 21)
    assert conf.sum() == 1 and conf[1, 1] == 1
    assert miou(conf) == 100.0                       # only class 1 is defined; others nan and left out
    assert torch.isnan(iou_per_class(conf)[0])

def test_confusion_matrix_errors():
    a = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"): confusion_matrix(a, a.T, 2)
    with pytest.raises(ValueError, match="pred has values"): confusion_matrix(a + 5, a, 2)
    with pytest.raises(ValueError, match="pred has values"): confusion_matrix(a - 1, a, 2)

def test_confusion_matrices_add_over_batches():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 5, (6, 8, 8), generator=g), torch.randint(0, 5, (6, 8, 8), generator=g)
    target[target == 4] = 255
    whole = confusion_matrix(pred, target, 5)
    assert torch.equal(whole, confusion_matrix(pred[:2], target[:2], 5) + confusion_matrix(pred[2:], target[2:], 5))
    assert whole.sum() == (target != 255).sum()

# ---------------------------------------------------------------- pseudo masks
def _strength():
    s = torch.tensor([[[[0.9, 0.2, 0.1]], [[1.0, 1.0, 1.0]], [[0.5, 0.6, 0.2]]]])
    return s, torch.tensor([[1., 0., 1.]])

def test_absent_classes_never_appear():
    g = torch.Generator().manual_seed(1)
    s, lab = torch.rand(8, 5, 6, 6, generator=g), (torch.rand(8, 5, generator=g) > 0.6).float()
    s[:, 2] = 1.0                                   # class 2 is strongest everywhere
    m = pseudo_masks(s, lab, size=(24, 24), bg_threshold=0.2)
    for i in range(8):
        allowed = {0} | set((lab[i].nonzero().flatten() + 1).tolist())
        assert set(m[i].unique().tolist()) <= allowed

def test_threshold_behaviour():
    s, lab = _strength()
    assert pseudo_masks(s, lab).tolist() == [[[1, 3, 0]]]
    assert pseudo_masks(s, lab, bg_threshold=0.65).tolist() == [[[1, 0, 0]]]
    assert pseudo_masks(s, lab, bg_threshold=0.0).tolist() == [[[1, 3, 3]]]
    assert pseudo_masks(s, lab, bg_threshold=1.0).tolist() == [[[0, 0, 0]]]
    # more background as the threshold rises, monotonically
    g = torch.Generator().manual_seed(2)
    rs, rl = torch.rand(4, 3, 5, 5, generator=g), torch.ones(4, 3)
    counts = [(pseudo_masks(rs, rl, bg_threshold=t) == 0).sum() for t in (0.1, 0.3, 0.5, 0.7)]
    assert counts == sorted(counts)

def test_saliency_cue_and_shapes():
    s, lab = _strength()
    # mined and salient -> the class; salient but not mined, or mined but not salient -> 255 (the cues disagree)
    assert pseudo_masks(s, lab, saliency=torch.tensor([[[0.9, 0.1, 0.9]]])).tolist() == [[[1, 255, 255]]]
    assert pseudo_masks(s, lab, saliency=torch.tensor([[[0.9, 0.9, 0.05]]])).tolist() == [[[1, 3, 0]]]
    assert pseudo_masks(s, lab, size=(4, 9)).shape == (1, 4, 9)
    with pytest.raises(ValueError, match="saliency"): pseudo_masks(s, lab, saliency=torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match=r"\(N,C\)"): pseudo_masks(s, lab[:, :2])

def test_probs_argmax_is_pseudo_masks():
    g = torch.Generator().manual_seed(3)
    rs, rl = torch.rand(5, 4, 7, 9, generator=g), (torch.rand(5, 4, generator=g) > 0.5).float()
    for t in (0.2, 0.5):
        p = pseudo_probs(rs, rl, size=14, bg_threshold=t)
        assert torch.allclose(p.sum(1), torch.ones(5, 14, 14))
        assert torch.equal(p.argmax(1), pseudo_masks(rs, rl, size=14, bg_threshold=t))

def test_load_saliency(tmp_path):
    Image.fromarray(np.array([[0, 255]], np.uint8)).save(tmp_path / "x.png")
    assert load_saliency(tmp_path, ["x"]).tolist() == [[[0.0, 1.0]]]
    with pytest.raises(FileNotFoundError, match="y.png"): load_saliency(tmp_path, ["x", "y"])

# ---------------------------------------------------------------- dense CRF
def _two_colour_toy(size=64):
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - 32) ** 2 + (xx - 30) ** 2 < 15 ** 2
    img = np.where(disc[..., None], np.uint8([200, 40, 40]), np.uint8([40, 160, 60])).astype(np.uint8)
    guess = torch.tensor(((yy - 35) ** 2 + (xx - 34) ** 2 < 13 ** 2), dtype=torch.float32)[None, None]
    guess = F.avg_pool2d(guess, 9, stride=1, padding=4, count_include_pad=False)[0, 0].numpy()   # blurred, shifted
    return img, disc, guess

def _iou(a, b): return (a & b).sum() / (a | b).sum()

def test_crf_sharpens_blurred_mask_to_edges():
    img, disc, guess = _two_colour_toy()
    probs = np.stack([1 - 0.9 * guess, 0.9 * guess + 0.05])
    out = dense_crf(img, probs)
    assert out.shape == (64, 64) and out.dtype == np.int64
    before, after = _iou(probs.argmax(0) == 1, disc), _iou(out == 1, disc)
    assert after > before + 0.2 and after > 0.9

def test_crf_refine_from_strength_improves_iou_and_keeps_labels():
    img, disc, guess = _two_colour_toy()
    images = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    strength = torch.zeros(1, 3, 64, 64); strength[0, 1] = torch.from_numpy(guess); strength[0, 2] = 1.0  # 2 absent
    labels = torch.tensor([[0., 1., 0.]])
    raw = pseudo_masks(strength, labels, size=64)
    ref = crf_refine(images, F.avg_pool2d(strength, 8), labels)            # coarse strengths, as from features
    assert ref.shape == (1, 64, 64) and ref.dtype == torch.int64
    assert set(ref.unique().tolist()) <= {0, 2}
    assert _iou(ref[0].numpy() == 2, disc) > _iou(raw[0].numpy() == 2, disc) + 0.1
    ref_m = crf_refine(images, raw, labels)                                   # from a hard mask
    assert _iou(ref_m[0].numpy() == 2, disc) > _iou(raw[0].numpy() == 2, disc)

def test_crf_errors():
    img, disc, guess = _two_colour_toy()
    probs = np.stack([1 - guess, guess])
    with pytest.raises(ValueError, match="uint8"): dense_crf(img.astype(np.float32), probs)
    with pytest.raises(ValueError, match="differ"): dense_crf(img, probs[:, :10])
    images = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\[0, 1\]"): crf_refine(images * 3, torch.rand(1, 2, 8, 8), torch.ones(1, 2))
    with pytest.raises(ValueError, match="strength_or_mask"): crf_refine(images, torch.rand(1, 64, 64), torch.ones(1, 2))

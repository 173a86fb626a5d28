"The gap decomposition (09_demo `headroom`): the oracle, fixed T, the stop rule, the one-count curves, and erasing's one run of K_max steps."
import math
import torch
from multiminer.baselines import ErasingConfig, fixed_erasing
from multiminer.models import ParallelModulator
from multiminer.mining import object_index
from multiminer.pseudo import pseudo_masks
from multiminer.demo import (threshold_curve, pseudo_miou, step_headroom, step_overlap, dense_strength, object_iou,
                             spearman, premise, best_threshold)


def _random_case(seed, N=10, C=3, L=4, h=4, H=12):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(N, C, generator=g) < .6).float(); labels[labels.sum(1) == 0, 0] = 1
    objects = object_index(labels)
    steps = torch.rand(L, len(objects), h, h, generator=g)
    masks = torch.randint(0, C + 1, (N, H, H), generator=g); masks[0, :2] = 255
    return labels, objects, steps, masks


def test_erasing_k_max_run_holds_every_shorter_run():
    torch.manual_seed(0)
    mod, feats = ParallelModulator(8, 3, width=16), torch.randn(12, 8, 6, 6)
    lab = (torch.rand(12, 3) < .5).float(); lab[lab.sum(1) == 0, 1] = 1
    cfg = lambda k: ErasingConfig(steps=k, n_m=1, batch_size=4)
    long = fixed_erasing(mod, feats, lab, cfg(5), progress=False, keep_steps=True)
    for k in range(1, 6):
        assert torch.equal(long.strength_after(k), fixed_erasing(mod, feats, lab, cfg(k), progress=False).strength)


def test_oracle_beats_every_fixed_T_on_bands():
    "Objects of width 1, 2, 3 mined one column per step: the oracle stops each at its width and is perfect."
    L, W = 5, 8
    steps = torch.zeros(L, 3, 1, W)
    for t in range(L): steps[t, :, 0, t] = 1.
    objects, labels = torch.tensor([[0, 0], [1, 0], [2, 0]]), torch.ones(3, 1)
    gt = torch.zeros(3, 1, W, dtype=torch.long)
    for k, w in enumerate((1, 2, 3)): gt[k, 0, :w] = 1
    h = step_headroom(steps, objects, labels, gt, 0.5, stop_steps=torch.tensor([3, 3, 3]))
    assert h['oracle_steps'].tolist() == [1, 2, 3]
    assert all(h['oracle_T'] > f for f in h['fixed_T'])
    assert h['stop_rule'] == h['fixed_T'][2]            # everyone stopping at 3 is fixed T = 3
    assert math.isclose(spearman([1, 2, 3], h['oracle_steps']), 1.0)
    assert step_overlap(steps, 0.5) == [0.0] * (L - 1)


def test_fixed_T_and_oracle_agree_with_the_slow_path():
    labels, objects, steps, masks = _random_case(3)
    N, C = labels.shape
    h = step_headroom(steps, objects, labels, masks, 0.4, stop_steps=torch.tensor([1, 4] * (len(objects) // 2) + [2] * (len(objects) % 2)))
    ious = []
    for T in range(len(steps)):
        merged = dense_strength(steps[:T + 1].amax(0), objects, N, C)
        assert abs(h['fixed_T'][T] - pseudo_miou(merged, labels, masks, 0.4)) < 0.006
        ious.append(object_iou(pseudo_masks(merged, labels, size=masks.shape[-2:], bg_threshold=0.4), masks, objects))
    assert torch.equal(torch.stack(ious).argmax(0) + 1, h['oracle_steps'])


def test_threshold_curve_is_pseudo_miou_at_each_threshold():
    labels, objects, steps, masks = _random_case(5)
    s = dense_strength(steps[0], objects, *labels.shape)
    sal = torch.rand(masks.shape, generator=torch.Generator().manual_seed(1)) * .3
    for cue in (None, sal):
        c = threshold_curve(s, labels, masks, (0.6, 0.05, 0.3), saliency=cue)
        assert c == {t: round(pseudo_miou(s, labels, masks, t, saliency=cue), 2) for t in (0.6, 0.05, 0.3)}


def test_premise_reads_the_curves():
    hr = dict(threshold_curve=dict(cam=dict(threshold={'0.05': 30., '0.2': 40., '0.5': 35.}, saliency={'0.1': 41.}),
                                   fixed_erasing=dict(threshold={'0.1': 1.}, saliency={'0.1': 45., '0.3': 44.})),
              fixed_T=dict(fixed_erasing=[40., 42., 41.]), oracle_T=dict(fixed_erasing=47.5),
              oracle_T_area_spearman=dict(fixed_erasing=0.6))
    p = premise(hr)
    assert p == {'cam_best_threshold': 0.2, 'cam_drop_at_0.05': 10.0, 'erasing_minus_cam': 4.0,
                 'oracle_minus_fixed_erasing': 5.5, 'oracle_k_area_spearman': 0.6}
    assert best_threshold({'0.1': 3., '0.2': 3.}) == 0.1

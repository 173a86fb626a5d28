"The explorer: its drawing function without a browser, and its data and widget on a tiny demo folder and a tiny mined set."
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from multiminer.demo import run_demo
from multiminer.explorer import (Explorer, draw_object, load_demo, mine_small, object_row, object_view, pseudo_mask,
                                 quick_settings, settings_from_dict)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _disc(n=32, radius=9):
    yy, xx = np.mgrid[:n, :n]
    return np.hypot(yy - n / 2, xx - n / 2)


def test_draw_object_numpy_without_judge_or_steps():
    r = _disc()
    gt = np.where(r < 9, 3, 0)
    gt[0, 0] = 255                                               # an ignored pixel is drawn, not an error
    img = np.random.default_rng(0).random((32, 32, 3))          # (H, W, 3) is accepted as well as (3, H, W)
    fig = draw_object(img, gt, cls=2, merged=(r < 6).astype(float), bg_threshold=0.5)
    assert isinstance(fig, Figure)
    top = fig.axes[:5]
    assert top[1].get_title() == f"ground truth\nclass 3, {int((gt == 3).sum())} px"
    assert 'no judge' in top[4].texts[0].get_text()             # CAM / erasing: nothing decides when to stop
    assert 'no pseudo\nmask' in top[3].texts[0].get_text()
    assert 'no per-step maps' in fig.axes[5].texts[0].get_text()
    assert len(top[2].collections) >= 1                          # the 'mined' contour on the merged map


def test_draw_object_steps_and_stop():
    r = torch.from_numpy(_disc()).float()
    maps = [(r < 4).float(), ((r >= 4) & (r < 8)).float(), (r >= 8).float()]
    probs = torch.tensor([0.8, 0.6, 0.2])
    fig = draw_object(torch.rand(3, 32, 32), (r < 9).long(), 0, merged=(r < 8).float(), step_maps=maps, probs=probs,
                      step=2, stop_step=3, stop_threshold=0.5, scales=[32, 40, 48], note='why', title='t')
    below = fig.axes[5:]
    assert len(below) == 5
    assert [a.get_title() for a in below[:3]] == ['step 1 @32px', 'step 2 @40px', 'step 3 @48px\nnot stored: stop']
    assert below[1].spines['left'].get_linewidth() == 2.5 and below[0].spines['left'].get_linewidth() != 2.5
    assert below[2].images[0].get_alpha() == 0.35 and below[0].images[0].get_alpha() == 1.0
    p_ax = fig.axes[4]
    np.testing.assert_allclose(p_ax.lines[0].get_ydata(), probs.numpy())
    assert list(p_ax.lines[1].get_xdata()) == [3]                # the stop marker
    assert fig._suptitle.get_text() == 't' and fig._supxlabel.get_text() == 'why'
    # no stop: every step drawn at full strength, no marker
    fig = draw_object(torch.rand(3, 32, 32), (r < 9).long(), 0, merged=(r < 8).float(), step_maps=maps, probs=probs)
    assert all(a.images[0].get_alpha() == 1.0 for a in fig.axes[5:8])
    assert len(fig.axes[4].lines) == 2                           # the curve and the selected-step line, no marker


@pytest.mark.parametrize('kw, msg', [(dict(image=np.zeros((5, 32, 32))), 'image must be'),
                                     (dict(gt=np.zeros((16, 16))), 'gt must be'),
                                     (dict(merged=np.zeros((16, 16))), 'merged must be'),
                                     (dict(step=4), 'step must be')])
def test_draw_object_errors(kw, msg):
    args = dict(image=np.zeros((3, 32, 32)), gt=np.zeros((32, 32)), cls=0, merged=np.zeros((32, 32)),
                step_maps=[np.zeros((32, 32))] * 3)
    with pytest.raises(ValueError, match=msg): draw_object(**{**args, **kw})


def _tiny(image_size=32, keep=-1):
    settings = quick_settings(n_classes=3, image_size=image_size, seed=1, max_steps=3)
    settings.classifier = replace(settings.classifier, epochs=2, lr_step_epoch=None)
    settings.mining = replace(settings.mining, n_m=1, keep_step_maps=keep)
    settings.erasing = replace(settings.erasing, n_m=1)
    settings.saliency = replace(settings.saliency, epochs=1)
    settings.n_saliency = 16
    return settings


@pytest.fixture(scope='module')
def demo_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    run_demo(out=out, seed=1, n_images=16, n_classes=3, image_size=32, crf=False, segmentation=False, progress=False,
             settings=_tiny(keep=4))
    return out


def test_settings_round_trip(demo_folder):
    d = json.loads((demo_folder/'metrics.json').read_text())['config']['settings']
    settings = settings_from_dict(d)
    assert settings.to_dict() == d
    with pytest.raises(ValueError, match='lack'): settings_from_dict({'mining': {}})


def test_load_demo_reproduces_the_saved_scores(demo_folder):
    data = load_demo(demo_folder, progress=False)
    # CAM and erasing are recomputed, the multi-miner's result is reloaded: the pseudo masks score as the demo saved
    assert data.info['pseudo_miou'] == pytest.approx(data.info['saved_pseudo_miou'], abs=0.01)
    assert data.saliency is not None and 'saliency' in data.cues()
    kept = len(data.steps['multiminer'][0]['maps'])
    assert kept == int((data.objects[:, 0] < 4).sum()) < len(data.objects)   # keep_step_maps=4: the first 4 images
    i, c = data.objects[-1].tolist()                             # an object without per-step maps still draws
    v = object_view(data, 'multiminer', i, c, 'saliency')
    assert v['step_maps'] == [] and 'kept for the first' in v['title']
    draw_object(**v)
    with pytest.raises(FileNotFoundError, match='multiminer demo'): load_demo(demo_folder/'nothing')


def test_mine_small_views_and_widget():
    data = mine_small(n_images=16, n_classes=3, image_size=32, seed=2, settings=_tiny())
    r, n_obj = data.result, len(data.objects)
    assert {m: len(s[0]['maps']) for m, s in data.steps.items()} == dict(cam=n_obj, fixed_erasing=n_obj, multiminer=n_obj)
    for k, (i, c) in enumerate(data.objects.tolist()):
        assert object_row(data, i, c) == k
        for m in ('cam', 'fixed_erasing', 'multiminer'):
            v = object_view(data, m, i, c)
            full = torch.nn.functional.interpolate(data.strengths[m][i, c][None, None], size=(32, 32), mode='bilinear',
                                                   align_corners=False)[0, 0].clamp(0, 1)
            assert (v['merged'] - full).abs().max() < 0.02      # Eq. 7 over the stored steps = the merged strength
            first = object_view(data, m, i, c, step=1)['merged']
            assert (first <= v['merged'] + 1e-6).all()           # merging more steps never un-mines
        v = object_view(data, 'multiminer', i, c)
        if r.stop_reason[k] in (1, 2):            # stopped by the rule (3: still mining at the cap)
            assert v['stop_step'] == int(r.steps[k]) + 1
            if r.stop_reason[k] == 1: assert v['probs'][v['stop_step'] - 1] < data.settings.mining.stop_threshold
    absent = int((data.labels[0] == 0).nonzero()[0, 0])
    with pytest.raises(ValueError, match='has no object'): object_row(data, 0, absent)
    with pytest.raises(ValueError, match='method must be'): object_view(data, 'oaa', *data.objects[0].tolist())
    with pytest.raises(ValueError, match='not available'):
        pseudo_mask(replace(data, saliency=None), 'cam', 0, 'saliency')
    pm = pseudo_mask(data, 'multiminer', 0, 'threshold')
    assert set(pm.unique().tolist()) <= {0} | {c + 1 for c in data.labels[0].nonzero()[:, 0].tolist()}

    ex = Explorer(data)                                          # built and driven without a browser
    first = ex.figure
    assert first is not None and ex.step.value == ex.step.max == data.n_steps('multiminer')
    ex.method.value = 'cam'
    assert ex.step.max == 1 and 'CAM' in ex.figure._suptitle.get_text() and ex.figure is not first
    ex.method.value = 'fixed_erasing'; ex.step.value = 1
    assert ex.figure.axes[2].get_title() == 'merged\nsteps 1..1'
    j = int(data.objects[-1, 0])
    ex.image.value = j
    assert [c for _, c in ex.object.options] == data.labels[j].nonzero()[:, 0].tolist()
    assert ex.figure._suptitle.get_text().startswith(f'image {j} ')
    if 'crf' in data.cues():
        ex.cue.value = 'crf'
        assert 'cue: crf' in ex.figure._suptitle.get_text()


def _font_sizes(fig):
    "The size (pt) of every piece of text a reader sees in `fig`: titles, labels, tick labels, notes."
    texts = list(fig.texts)
    for a in fig.axes:
        texts += [a.title, a._left_title, a._right_title, a.xaxis.label, a.yaxis.label, *a.texts]
        texts += [t for t in a.get_xticklabels() + a.get_yticklabels()]
    return [t.get_fontsize() for t in texts if t.get_text().strip()]


def test_draw_object_is_readable_at_page_width():
    "At most 5 step panels a row (more steps wrap), a figure as wide as the page (6.6 in), no label under 9 pt."
    r = torch.from_numpy(_disc()).float()
    for T in (3, 7, 10):
        maps = [(r < 2 + 2 * t).float() for t in range(T)]
        fig = draw_object(torch.rand(3, 32, 32), (r < 9).long(), 0, merged=maps[-1], step_maps=maps,
                          probs=torch.linspace(0.9, 0.1, T), stop_step=T, stop_threshold=0.5, scales=[32] * T,
                          note='a long note ' * 20, title='a long title ' * 10)
        rows = {}
        for a in fig.axes[5:]: rows.setdefault(round(a.get_position().y0, 3), []).append(a)
        assert max(len(v) for v in rows.values()) <= 5 and len(fig.axes) - 5 == 5 * -(-T // 5)
        assert fig.get_figwidth() == pytest.approx(6.6)
        assert min(_font_sizes(fig)) >= 9
        fig.canvas.draw()                                        # the note and title are wrapped to the figure's width
        w = fig.get_window_extent().width
        assert all(t.get_window_extent().width <= w for t in (fig._suptitle, fig._supxlabel))


def test_explorer_displays_nothing_until_shown(monkeypatch):
    "Built and driven without being shown, the explorer displays nothing (a page shows its figure once); shown, it displays."
    import multiminer.explorer as E
    shown = []
    monkeypatch.setattr(E, 'display', lambda *a, **k: shown.append(a))
    monkeypatch.setattr(E, 'clear_output', lambda *a, **k: shown.append('clear'))
    data = mine_small(n_images=8, n_classes=3, image_size=32, seed=1, settings=_tiny())
    ex = Explorer(data)
    ex.method.value = 'cam'; ex.method.value = 'multiminer'; ex.step.value = 1
    assert shown == [] and ex.figure is not None
    ex._ipython_display_()
    assert shown[0] == (ex.widget,) and 'clear' in shown
    n = len(shown); ex.method.value = 'cam'
    assert len(shown) > n                                        # once shown, each change redraws the output area


def test_no_empty_row_after_the_stop():
    "Steps after the stop get no panels of their own: six steps that stopped at step 5 fill one row."
    r = torch.from_numpy(_disc()).float()
    maps = [(r < 2 + 2 * t).float() for t in range(6)]
    fig = draw_object(torch.rand(3, 32, 32), (r < 9).long(), 0, merged=maps[3], step_maps=maps, stop_step=5)
    assert len(fig.axes) == 5 + 5

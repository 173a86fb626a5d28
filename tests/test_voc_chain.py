"""The paper-scale path end to end (issue 13): `--preset voc` on a VOC-format fixture, on the CPU.

train-classifier -> mine -> pseudo-labels -> train-seg -> evaluate with the VGG-16 extractor (paper pooling, output
stride 8), 321-px crops, the 256/321/417 mining schedule and DeepLab-LargeFOV, each stage checked against what
nbs/10_voc_recipe.ipynb says it writes. Only the sizes are tiny: two training images (one VOC, one SBD-only), one
validation image, one epoch per network, a 16-channel modulator; the VGG-16 "ImageNet" weights are a random
VGG-16 saved in torchvision's layout and read through --weights, as an offline machine would.
"""
import contextlib, errno, io, json, shutil, time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multiminer.cli import main, load_mining_result
from multiminer.runtime import read_run
from multiminer.runtime import file_sha256, tree_sha256
from cli_helpers import run_cli, ok
from multiminer.classifier import load_classifier
from multiminer.data import make_voc_fixture, read_mask_file, voc_dataset
from multiminer.metrics import confusion_matrix, miou
from multiminer.models import VGG16Extractor, load_checkpoint
from multiminer.segmentation import DeepLabLargeFOV, load_segmentation_model
from multiminer.pseudo import pseudo_masks
from multiminer.mining import MiningResult
from multiminer.pipeline import VOC_TEST_RESULTS

TRAIN, VAL = ['a1', 's1'], ['v1']          # train_aug = VOC train (a1) + SBD-only (s1); val = VOC val
SIZE = (40, 56)                             # the fixture's image size (H, W)
TEST, TEST_SIZE = ['t1', 't2'], (33, 47)     # VOC test ids (no masks), written beside the fixture


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
    "The five stages with --preset voc on the fixture; {stage: seconds} of each, and the folder they wrote in."
    t = tmp_path_factory.mktemp('vocchain')
    classes = make_voc_fixture(t/'DATA', voc_train=('a1',), voc_val=tuple(VAL), sbd_train=('s1',), sbd_val=(), size=SIZE)
    vgg = t/'vgg16-397923af.pth'      # torchvision's key names ('features.<i>.weight'), random values
    torch.save({f'features.{k}': v for k, v in VGG16Extractor().state_dict().items()}, vgg)
    voc2012 = t/'DATA'/'VOCdevkit'/'VOC2012'        # the test split: ids and images only, another size
    (voc2012/'ImageSets'/'Segmentation'/'test.txt').write_text(''.join(f'{n}\n' for n in TEST))
    for n in TEST: Image.fromarray(np.random.default_rng(1).integers(0, 256, TEST_SIZE + (3,), np.uint8)).save(voc2012/'JPEGImages'/f'{n}.jpg')
    sal = t/'saliency'; sal.mkdir()
    for n in TRAIN: Image.fromarray(np.full(SIZE, 255, np.uint8)).save(sal/f'{n}.png')
    voc = ['--preset', 'voc', '--voc-root', t/'DATA'/'VOCdevkit', '--workers', 0]
    secs, t0 = {}, time.time()
    def stage(name, *argv):
        nonlocal t0
        ok(name.split()[0], *argv); secs[name] = round(time.time() - t0, 1); t0 = time.time()
    stage('train-classifier', *voc, '--weights', vgg, '--epochs', 1, '--batch-size', 2, '--modulator-width', 16,
          '--out', t/'classifier')
    stage('mine', '--classifier', t/'classifier', '--out', t/'mining', '--max-steps', 3, '--by-steps', '--snapshots')
    stage('pseudo-labels', '--mining', t/'mining', '--out', t/'pseudo', '--saliency', sal, '--crf')
    stage('erase', '--classifier', t/'classifier', '--out', t/'erasing', '--steps', 2)
    stage('pseudo-labels from erasing', '--mining', t/'erasing', '--out', t/'pseudo-erasing')
    stage('train-seg', *voc, '--model', 'deeplab-largefov', '--weights', vgg, '--pseudo', t/'pseudo', '--epochs', 1,
          '--batch-size', 2, '--out', t/'seg')
    stage('evaluate', '--seg', t/'seg', '--split', 'val', '--crf', '--out', t/'eval')
    stage('evaluate --split test', '--seg', t/'seg', '--split', 'test', '--crf', '--out', t/'eval')
    print('seconds per stage:', secs)
    return dict(t=t, classes=classes, secs=secs, sal=sal)


def test_classifier_is_the_papers(chain):
    d = chain['t']/'classifier'
    rec = read_run(d)
    assert rec['finished'] is True and rec['preset'] == 'voc' and rec['data']['kind'] == 'voc'
    cfg = rec['config']
    assert (cfg['extractor'], cfg['input_size'], cfg['optimizer'], cfg['lr_extractor'], cfg['lr_modulator']) == \
           ('vgg16', 321, 'sgd', 1e-3, 1e-2)
    assert rec['outputs'] == {'classifier.pt': file_sha256(d/'classifier.pt')}
    clf = load_classifier(d)
    assert isinstance(clf.extractor, VGG16Extractor) and clf.extractor.stride == 8 and clf.n_classes == 20
    assert clf.modulator.width == 16 and len(clf.history) == 1
    # the --weights file was loaded: the untrained conv1_1 equals it up to one SGD step
    w0 = torch.load(chain['t']/'vgg16-397923af.pth', weights_only=True)['features.0.weight']
    assert (clf.extractor[0].weight - w0).abs().max() < 0.05 * w0.abs().max()
    with torch.no_grad(): f = clf.features(torch.zeros(1, 3, 321, 321))
    assert f.shape == (1, 512, 41, 41)               # output stride 8 at 321 px


def test_mining_runs_the_multiscale_schedule(chain):
    d = chain['t']/'mining'
    rec = read_run(d)
    cfg = rec['config']
    assert (tuple(cfg['scales']), tuple(cfg['batch_sizes']), cfg['n_m'], cfg['n_g']) == ((256, 321, 417), (256, 128, 64), 15, 1)
    summary = json.loads((d/'summary.json').read_text())
    scales = [h['scale'] for h in summary['history']]
    assert scales == [256, 321, 417][:len(scales)] and len(scales) >= 1
    # float16 conv5 features of both images at every scale, each with its completion marker
    for s in (256, 321, 417):
        feats = np.load(d/'features'/f'features_{s}.npy', mmap_mode='r')
        assert feats.dtype == np.float16 and feats.shape == (2, 512, -(-s // 8), -(-s // 8)), (s, feats.shape)
        assert json.loads((d/'features'/f'features_{s}.json').read_text())['size'] == s
    result, extra = load_mining_result(d)
    assert extra['names'] == TRAIN
    present = sorted((int(i), int(c)) for i, c in extra['labels'].nonzero())
    assert present == sorted((k, chain['classes'][n] - 1) for k, n in enumerate(TRAIN))   # labels from the masks
    assert len(result.objects) == 2 and result.merged.shape[-2:] == (53, 53)   # M^f at the largest scale's resolution
    assert 1 <= int(result.steps.min()) and int(result.steps.max()) <= len(scales)


def test_pseudo_masks_are_voc_pngs(chain):
    d = chain['t']/'pseudo'
    assert sorted(p.name for p in (d/'masks').iterdir()) == [f'{n}.png' for n in TRAIN]
    for n in TRAIN:
        png = Image.open(d/'masks'/f'{n}.png')
        assert png.mode == 'P' and png.size == SIZE[::-1]
        assert set(np.unique(read_mask_file(d/'masks'/f'{n}.png')).tolist()) <= {0, chain['classes'][n], 255}
    summary = json.loads((d/'summary.json').read_text())
    assert summary['crf'] is True and summary['n_images'] == 2 and 0 <= summary['miou'] <= 100
    assert len(summary['iou_per_class']) == 21


def test_segmentation_is_largefov(chain):
    d = chain['t']/'seg'
    cfg = read_run(d)['config']
    assert (cfg['model'], cfg['n_classes'], cfg['crop_size'], cfg['lr']) == ('deeplab-largefov', 21, 321, 1e-3)
    net = load_segmentation_model(d)
    assert isinstance(net, DeepLabLargeFOV) and net.n_classes == 21
    assert len(json.loads((d/'history.json').read_text())) == 1
    assert set(load_checkpoint(d/'checkpoint.pt')) >= {'model', 'epoch'}
    with torch.no_grad(): y = net(torch.rand(1, 3, *SIZE))
    assert y.shape == (1, 21) + SIZE


def test_evaluation_on_val(chain):
    ev = json.loads((chain['t']/'eval'/'eval_val.json').read_text())
    assert (ev['split'], ev['n_images'], ev['crf'], len(ev['iou_per_class'])) == ('val', 1, True, 21)
    assert 0 <= ev['miou'] <= 100
    assert read_run(chain['t']/'eval')['inputs']['seg']['files']['model.pt'] == file_sha256(chain['t']/'seg'/'model.pt')


def test_test_split_predictions_in_the_server_layout(chain):
    d = chain['t']/'eval'
    pred = d/'results'/'VOC2012'/'Segmentation'/'comp6_test_cls'
    assert sorted(p.name for p in pred.iterdir()) == [f'{n}.png' for n in TEST]
    for n in TEST:
        png = Image.open(pred/f'{n}.png')
        assert png.mode == 'P' and png.size == TEST_SIZE[::-1]
        assert int(np.asarray(png).max()) <= 20                   # class indices, no 255
    ev = json.loads((d/'eval_test.json').read_text())
    assert (ev['split'], ev['n_images'], ev['predictions']) == ('test', 2, 'results/VOC2012/Segmentation/comp6_test_cls')
    assert 'miou' not in ev
    rec = read_run(d)
    assert set(rec['outputs']) == {'eval_val.json', 'eval_test.json', 'results/VOC2012/Segmentation/comp6_test_cls'}
    code, _, err = run_cli('evaluate', '--seg', chain['t']/'seg', '--split', 'test', '--out', d)
    assert code == 2 and 'eval_test.json exists' in err                  # never overwritten without --force



@pytest.mark.parametrize('fault', ['a prediction', 'run.json'])
def test_test_predictions_on_a_full_disk_leave_a_new_folder_as_found(chain, tmp_path, monkeypatch, fault):
    "No space for the second PNG, or for run.json once all are written: exit 2, nothing left behind, and the same command runs once there is room."
    import multiminer.pipeline as pipeline
    out, real_png, real_run = tmp_path/'e', pipeline.save_mask_png, pipeline.write_run
    def png(m, path):
        if path.name == f'{TEST[1]}.png': raise OSError(errno.ENOSPC, 'No space left on device', str(path))
        return real_png(m, path)
    def run(o, command, *a, **k):
        if command == 'evaluate': raise OSError(errno.ENOSPC, 'No space left on device', str(Path(o)/'run.json'))
        return real_run(o, command, *a, **k)
    if fault == 'a prediction': monkeypatch.setattr(pipeline, 'save_mask_png', png)
    else: monkeypatch.setattr(pipeline, 'write_run', run)
    code, _, err = run_cli('evaluate', '--seg', chain['t']/'seg', '--split', 'test', '--out', out)
    assert code == 2 and 'No space left on device' in err and 'Traceback' not in err, err
    assert not out.exists() or not any(out.iterdir()), sorted(map(str, out.rglob('*')))
    monkeypatch.setattr(pipeline, 'save_mask_png', real_png); monkeypatch.setattr(pipeline, 'write_run', real_run)
    ok('evaluate', '--seg', chain['t']/'seg', '--split', 'test', '--out', out)
    assert read_run(out)['finished'] and len(list((out/VOC_TEST_RESULTS).iterdir())) == len(TEST)


def test_pseudo_labels_on_a_full_disk_name_the_file_and_leave_nothing(chain, tmp_path, monkeypatch):
    "PIL reports a failed write without the file's name: the message names it, and no masks.partial is left behind."
    real, calls = Image.Image.save, []
    def full(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 2: Path(fp).write_bytes(b'\x89PNG'); raise OSError(errno.ENOSPC, 'No space left on device')
        return real(self, fp, *a, **k)
    monkeypatch.setattr(Image.Image, 'save', full)
    code, _, err = run_cli('pseudo-labels', '--mining', chain['t']/'mining', '--out', tmp_path/'p', '--workers', 0)
    assert code == 2 and 'No space left on device' in err and 'masks.partial' in err and 'Traceback' not in err, err
    assert not (tmp_path/'p').exists() or not any((tmp_path/'p').iterdir()), sorted(map(str, (tmp_path/'p').rglob('*')))


def test_evaluate_force_replaces_test_predictions_that_changed(chain, tmp_path):
    "A folder whose predictions lost files (a run stopped while replacing them, a hand) is evaluated again with --force."
    d = shutil.copytree(chain['t']/'eval', tmp_path/'eval')
    next((d/VOC_TEST_RESULTS).iterdir()).unlink()
    ok('evaluate', '--seg', chain['t']/'seg', '--split', 'test', '--out', d, '--force')
    assert len(list((d/VOC_TEST_RESULTS).iterdir())) == len(TEST) and not (d/(VOC_TEST_RESULTS + '.old')).exists()
    assert read_run(d)['outputs'][VOC_TEST_RESULTS] == tree_sha256(d/VOC_TEST_RESULTS)


@pytest.mark.parametrize('bad', ['16-bit', 'size', 'missing'])
def test_mine_checks_its_saliency_maps_before_any_work(chain, tmp_path, bad):
    "As pseudo-labels does: 16-bit maps, maps of another size, missing maps are refused before features are extracted."
    sal = shutil.copytree(chain['sal'], tmp_path/'sal')
    first = sorted(sal.iterdir())[0]
    if bad == '16-bit': Image.fromarray(np.full(SIZE, 40000, np.uint16)).save(first)
    elif bad == 'size': Image.fromarray(np.full((7, 9), 255, np.uint8)).save(first)
    else: first.unlink()
    needle = {'16-bit': 'mode-I', 'size': 'is (7, 9)', 'missing': 'missing'}[bad]
    code, _, err = run_cli('mine', '--classifier', chain['t']/'classifier', '--out', tmp_path/'m', '--max-steps', 1,
                           '--saliency', sal, '--quiet')
    assert code == 2 and needle in err and 'Traceback' not in err, err
    assert not (tmp_path/'m').exists() or not any((tmp_path/'m').iterdir())

def test_fixed_step_erasing_on_voc(chain):
    d = chain['t']/'erasing'
    rec = read_run(d)
    cfg = rec['config']
    assert rec['finished'] and (cfg['steps'], tuple(cfg['scales']), cfg['n_m'], cfg['optimizer']) == (2, (256, 321, 417), 15, 'sgd')
    summary = json.loads((d/'summary.json').read_text())
    assert [h['scale'] for h in summary['history']] == [256, 321]
    result, extra = load_mining_result(d)
    assert extra['names'] == TRAIN and (result.steps == 2).all() and result.merged.shape[-2:] == (53, 53)
    assert sorted(p.name for p in (d/'features').glob('*.npy')) == [f'features_{s}.npy' for s in (256, 321, 417)]
    masks = chain['t']/'pseudo-erasing'/'masks'
    assert sorted(p.name for p in masks.iterdir()) == [f'{n}.png' for n in TRAIN]
    assert Image.open(masks/'a1.png').size == SIZE[::-1]


def _masks(folder):
    return {n: read_mask_file(folder/'masks'/f'{n}.png') for n in TRAIN}


def test_fig6_by_steps_on_voc(chain):
    "mine --by-steps: one pseudo-mask mIoU per step; the last is the mIoU of mining_result.pt's masks, recomputed here."
    d = chain['t']/'mining'
    summary, rec = json.loads((d/'summary.json').read_text()), read_run(d)
    n = summary['steps_run']
    curve = summary['miou_by_steps']
    assert len(curve) == n == len(summary['history']) == rec['steps_run'] and rec['by_steps'] and rec['snapshots']
    assert [h['miou_merged'] for h in summary['history']] == curve and all(0 <= v <= 100 for v in curve)
    result, extra = load_mining_result(d)
    ds = voc_dataset(chain['t']/'DATA', 'train_aug')
    conf = 0
    for i in range(len(TRAIN)):            # each image at its own size, from the dense strengths of mining_result.pt
        gt = torch.as_tensor(ds.load_mask(i))
        pm = pseudo_masks(result.strength()[i:i + 1], extra['labels'][i:i + 1], size=tuple(gt.shape),
                          bg_threshold=result.mined_threshold)[0]
        conf = conf + confusion_matrix(pm, gt, 21)
    assert abs(curve[-1] - miou(conf)) < 1e-6
    assert (d/'fig_miou_by_steps.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # the snapshots: one per step, plain tensors, hashed in run.json; the last one is M^f of mining_result.pt in uint8
    assert sorted(k for k in rec['outputs'] if k.startswith('snapshots/')) == [f'snapshots/step_{t}.pt' for t in range(1, n + 1)]
    for t in range(1, n + 1):
        p = d/'snapshots'/f'step_{t}.pt'
        assert rec['outputs'][f'snapshots/step_{t}.pt'] == file_sha256(p)
        snap = load_checkpoint(p)
        assert snap['step'] == t and snap['merged'].dtype == torch.uint8 and snap['merged'].shape == (2, 53, 53)
        assert torch.equal(snap['objects'], result.objects) and int(snap['steps'].max()) <= t
    assert torch.equal(snap['merged'], (result.merged * 255).round().to(torch.uint8)) and torch.equal(snap['steps'], result.steps)


def test_fig6_pseudo_labels_steps_on_voc(chain):
    "pseudo-labels --steps T: T = last is the run without --steps; T = 1 is snapshot 1's masks; refusals exit 2."
    t, n = chain['t'], read_run(chain['t']/'mining')['steps_run']
    ok('pseudo-labels', '--mining', t/'mining', '--out', t/'pseudo-last', '--steps', n, '--saliency', chain['sal'], '--crf')
    a, b = _masks(t/'pseudo'), _masks(t/'pseudo-last')
    assert all(np.array_equal(a[k], b[k]) for k in TRAIN)
    assert read_run(t/'pseudo-last')['config']['steps'] == n == read_run(t/'pseudo')['config']['steps']
    assert json.loads((t/'pseudo-last'/'summary.json').read_text())['steps'] == n
    ok('pseudo-labels', '--mining', t/'mining', '--out', t/'pseudo-1', '--steps', 1)
    result, extra = load_mining_result(t/'mining')
    snap = load_checkpoint(t/'mining'/'snapshots'/'step_1.pt')
    r1 = MiningResult(objects=snap['objects'], steps=snap['steps'], merged=snap['merged'].float() / 255, n_images=2,
                      n_classes=20, region_threshold=result.region_threshold)
    want = pseudo_masks(r1.strength(), extra['labels'], size=SIZE, bg_threshold=r1.mined_threshold)
    got = _masks(t/'pseudo-1')
    assert all(np.array_equal(got[k], want[i].numpy()) for i, k in enumerate(TRAIN))
    assert read_run(t/'pseudo-1')['config']['steps'] == 1
    code, _, err = run_cli('pseudo-labels', '--mining', t/'mining', '--out', t/'pseudo-x', '--steps', n + 1)
    assert code == 2 and f'--steps {n + 1}: the mining run in' in err and f'choose T in 1..{n}' in err, err
    assert 'Traceback' not in err and not (t/'pseudo-x').exists()
    code, _, err = run_cli('pseudo-labels', '--mining', t/'erasing', '--out', t/'pseudo-x', '--steps', 1)
    assert code == 2 and 'keeps no per-step snapshots' in err and not (t/'pseudo-x').exists()


def test_a_feature_cache_changed_since_is_extracted_again(chain, tmp_path):
    """A features_<s>.npy of `mine`'s cache written to since its marker (other values, another shape, cut short, objects):
    --resume does not reuse it but extracts it again, and the run goes on as if it had never changed. A damaged marker
    vouches for nothing either."""
    import shutil
    t = chain['t']
    for name, damage in [('values', lambda p: np.save(p, np.load(p) * 2)),
                         ('shape', lambda p: np.save(p, np.zeros((2, 3, 4, 4), np.float16))),
                         ('truncated', lambda p: p.write_bytes(p.read_bytes()[:200])),
                         ('objects', lambda p: np.save(p, np.array([{'a': 1}], dtype=object), allow_pickle=True)),
                         ('marker', lambda p: p.with_suffix('.json').write_text('{"size": 3'))]:
        m = tmp_path/name
        shutil.copytree(t/'mining', m)
        damage(m/'features'/'features_256.npy')
        ok('mine', '--classifier', t/'classifier', '--out', m, '--max-steps', 3, '--by-steps', '--snapshots', '--resume')
        assert np.array_equal(np.load(m/'features'/'features_256.npy'), np.load(t/'mining'/'features'/'features_256.npy')), name

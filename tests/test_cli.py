"The `multiminer` command: exit codes and messages, and every stage end to end on tiny synthetic and VOC-fixture data."
import contextlib, io, json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multiminer.cli import main, load_mining_result
from multiminer.runtime import read_run
from multiminer.runtime import file_sha256
from cli_helpers import run_cli, _one_thread
from multiminer.data import make_voc_fixture

ROOT = Path(__file__).resolve().parent.parent


from crafted_checkpoints import RunsCode, crafted


def test_module_entry_point_exit_codes(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'multiminer.cli', '--help'], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0 and 'train-classifier' in r.stdout
    r = subprocess.run([sys.executable, '-m', 'multiminer.cli', 'demo', '--image-size', '100', '--out',
                        str(tmp_path/'d')], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == 'multiminer demo: error: --image-size must be a multiple of 8 (the extractors\' output stride), got 100'
    assert not (tmp_path/'d').exists()


@pytest.mark.parametrize('argv, needle', [
    (['train-seg', '--pseudo', 'p', '--out', 'o', '--model', 'unet'], "invalid choice: 'unet'"),
    (['train-seg', '--pseudo', 'p', '--out', 'o', '--preset', 'coco'], "invalid choice: 'coco'"),
    (['train-classifier', '--data', 'synthetic', '--n-images', '-4', '--out', 'o'], 'must be an integer >= 2'),
    (['train-classifier', '--data', 'synthetic', '--epochs', '0', '--out', 'o'], 'must be an integer >= 1'),
    (['pseudo-labels', '--mining', 'm', '--out', 'o', '--bg-threshold', '1.5'], 'must be a number in (0, 1)'),
    (['evaluate', '--seg', 's', '--device', 'gpu'], "must be 'cpu' or 'cuda'"),
    (['mine', '--out', 'o'], 'the following arguments are required: --classifier'),
    (['demo', '--n-classes', '1'], 'multiminer demo: error: --n-classes'),
    (['demo', '--device', 'tpu'], 'multiminer demo: error: --device'),
])
def test_bad_values_exit_2(argv, needle):
    code, out, err = run_cli(*argv)
    assert code == 2 and needle in err, err


def test_missing_voc_root_exit_2(tmp_path):
    code, out, err = run_cli('train-classifier', '--preset', 'voc', '--voc-root', tmp_path/'nowhere', '--out', tmp_path/'c')
    assert code == 2 and out == ''
    assert err.startswith("multiminer train-classifier: error: PASCAL VOC 2012 data for split 'train_aug' not found")
    assert 'Traceback' not in err and not (tmp_path/'c').exists()
    # incomplete: VOC without SBD
    make_voc_fixture(tmp_path/'D')
    import shutil; shutil.rmtree(tmp_path/'D'/'benchmark_RELEASE')
    code, _, err = run_cli('train-classifier', '--voc-root', tmp_path/'D', '--out', tmp_path/'c')
    assert code == 2 and 'benchmark_RELEASE' in err
    code, _, err = run_cli('evaluate', '--preset', 'voc', '--seg', tmp_path/'none', '--out', tmp_path/'e')
    assert code == 2 and 'has no model.pt' in err


def test_synthetic_chain(tmp_path):
    syn = ['--data', 'synthetic', '--n-images', 24, '--image-size', 32, '--quiet']
    assert run_cli('train-classifier', *syn, '--epochs', 1, '--out', tmp_path/'c')[0] == 0
    code, _, err = run_cli('train-classifier', *syn, '--epochs', 1, '--out', tmp_path/'c')
    assert code == 2 and '--resume' in err          # never overwrites a checkpoint
    assert run_cli('mine', '--classifier', tmp_path/'c', '--out', tmp_path/'m', '--max-steps', 1, '--quiet')[0] == 0
    res, extra = load_mining_result(tmp_path/'m')
    assert extra['labels'].shape == (24, 4) and res.steps.max() == 1
    # resuming a finished mining run with a larger cap continues it
    code, out, _ = run_cli('mine', '--classifier', tmp_path/'c', '--out', tmp_path/'m', '--max-steps', 2, '--resume', '--quiet')
    assert code == 0 and len(load_mining_result(tmp_path/'m')[0].history) == 2
    code, out, _ = run_cli('pseudo-labels', '--mining', tmp_path/'m', '--out', tmp_path/'p', '--quiet')
    assert code == 0 and 'mIoU' in out
    pm = torch.load(tmp_path/'p'/'pseudo_masks.pt')
    assert pm.shape == (24, 32, 32) and int(pm.max()) <= 4
    assert read_run(tmp_path/'p')['data'] == dict(kind='synthetic', n_images=24, n_classes=4, image_size=32, seed=0)
    assert run_cli('train-seg', '--pseudo', tmp_path/'p', '--out', tmp_path/'s', '--epochs', 1, '--quiet')[0] == 0
    code, out, _ = run_cli('evaluate', '--seg', tmp_path/'s', '--n-val', 8, '--out', tmp_path/'e', '--quiet')
    assert code == 0 and out.startswith('mIoU')
    ev = json.loads((tmp_path/'e'/'eval_val.json').read_text())
    assert ev['n_images'] == 8 and len(ev['iou_per_class']) == 5 and 0 <= ev['miou'] <= 100


def test_voc_fixture_chain(tmp_path):
    make_voc_fixture(tmp_path/'DATA')
    voc = ['--preset', 'synthetic', '--data', 'voc', '--voc-root', tmp_path/'DATA', '--image-size', 32, '--quiet']
    assert run_cli('train-classifier', *voc, '--epochs', 1, '--workers', 0, '--out', tmp_path/'c')[0] == 0
    assert run_cli('mine', '--classifier', tmp_path/'c', '--out', tmp_path/'m', '--max-steps', 1, '--quiet')[0] == 0
    feats = sorted((tmp_path/'m'/'features').glob('*.npy'))
    assert len(feats) == 3
    stamp = feats[0].stat().st_mtime_ns
    # a resumed run reuses the stored features (their markers match the classifier)
    assert run_cli('mine', '--classifier', tmp_path/'c', '--out', tmp_path/'m', '--max-steps', 2, '--resume', '--quiet')[0] == 0
    assert feats[0].stat().st_mtime_ns == stamp
    names = load_mining_result(tmp_path/'m')[1]['names']
    assert names == ['a1', 'a2', 'a3', 's1', 's2', 's3']
    # pseudo-labels: the data root comes from the mining folder's run.json; CRF in 2 processes = in this one
    assert run_cli('pseudo-labels', '--mining', tmp_path/'m', '--out', tmp_path/'p0', '--crf', '--quiet')[0] == 0
    assert run_cli('pseudo-labels', '--mining', tmp_path/'m', '--out', tmp_path/'p', '--crf', '--workers', 2, '--quiet')[0] == 0
    for n in names:
        a, b = Image.open(tmp_path/'p0'/'masks'/f'{n}.png'), Image.open(tmp_path/'p'/'masks'/f'{n}.png')
        assert a.mode == 'P' and a.size == (56, 40) and np.array_equal(np.asarray(a), np.asarray(b))
    assert run_cli('train-seg', '--pseudo', tmp_path/'p', '--out', tmp_path/'s', '--epochs', 1, '--workers', 0,
                   '--quiet')[0] == 0
    code, out, _ = run_cli('evaluate', '--seg', tmp_path/'s', '--split', 'val', '--crf', '--out', tmp_path/'e', '--quiet')
    assert code == 0 and json.loads((tmp_path/'e'/'eval_val.json').read_text())['n_images'] == 2
    # a missing pseudo mask: the masks are not those pseudo-labels wrote
    (tmp_path/'p'/'masks'/'s2.png').unlink()
    code, _, err = run_cli('train-seg', '--pseudo', tmp_path/'p', '--out', tmp_path/'s2', '--epochs', 1, '--quiet')
    assert code == 2 and f"{tmp_path/'p'/'masks'} changed after" in err


def test_offline_imagenet_weights_exit_2(tmp_path):
    "The paper's preset needs ImageNet VGG-16 weights: offline, a clear message and exit 2, not a traceback."
    import urllib.error
    from unittest import mock
    make_voc_fixture(tmp_path/'DATA')
    old = torch.hub.get_dir(); torch.hub.set_dir(str(tmp_path/'hub'))
    def offline(*a, **k): raise urllib.error.URLError('no network in tests')
    try:
        with mock.patch('torch.hub.download_url_to_file', offline):
            code, _, err = run_cli('train-classifier', '--preset', 'voc', '--voc-root', tmp_path/'DATA', '--epochs', 1,
                                   '--workers', 0, '--out', tmp_path/'c')
    finally: torch.hub.set_dir(old)
    assert code == 2 and 'Could not obtain the ImageNet weights for VGG-16' in err and 'Traceback' not in err
    code, _, err = run_cli('train-classifier', '--preset', 'voc', '--voc-root', tmp_path/'DATA', '--weights',
                           tmp_path/'missing.pth', '--out', tmp_path/'c')
    assert code == 2 and 'missing.pth: no such file' in err


def test_recipe_command_lines_parse():
    "Not only `--help`: every `multiminer ...` line of the VOC recipe parses with all its flags."
    sys.path.insert(0, str(ROOT/'tests'))
    from test_recipe import recipe_commands
    from multiminer.cli import build_parser
    p = build_parser()
    for c in recipe_commands():
        args = p.parse_args(c.split()[1:])
        assert args.command == c.split()[1]


def test_load_mining_result_refuses_code(tmp_path):
    marker = tmp_path/'pwned_x'
    crafted(tmp_path/'mining_result.pt', marker, n_images=1)
    with pytest.raises(ValueError, match=r"refused to load '.*mining_result\.pt'"): load_mining_result(tmp_path)
    assert not marker.exists()


def test_commands_refuse_code_with_exit_2(tmp_path):
    "A crafted file where a stage reads a checkpoint: `multiminer ...: error: refused to load ...`, exit 2, nothing run."
    syn = ['--data', 'synthetic', '--n-images', 12, '--image-size', 32, '--quiet']
    assert run_cli('train-classifier', *syn, '--epochs', 1, '--out', tmp_path/'c')[0] == 0
    marker = tmp_path/'pwned_x'
    crafted(tmp_path/'c'/'classifier.pt', marker, config={})
    # the hash in run.json catches the swapped file first ...
    code, _, err = run_cli('mine', '--classifier', tmp_path/'c', '--out', tmp_path/'m', '--max-steps', 1, '--quiet')
    assert code == 2 and 'classifier.pt changed after' in err
    # ... and a hostile user who also rewrites the hash meets the loader's refusal
    rec = read_run(tmp_path/'c'); rec['outputs']['classifier.pt'] = file_sha256(tmp_path/'c'/'classifier.pt')
    (tmp_path/'c'/'run.json').write_text(json.dumps(rec))
    code, _, err = run_cli('mine', '--classifier', tmp_path/'c', '--out', tmp_path/'m', '--max-steps', 1, '--quiet')
    assert code == 2 and 'multiminer mine: error: refused to load' in err and 'classifier.pt' in err
    code, _, err = run_cli('train-classifier', *syn, '--epochs', 2, '--out', tmp_path/'c', '--resume')
    assert code == 2 and 'refused to load' in err
    assert not marker.exists()


def test_synthetic_data_is_the_demos(tmp_path):
    "--data synthetic is the demo's SyntheticScenes with the demo's settings (stride 4 ...); --data shapes the old set."
    from dataclasses import asdict, replace
    from multiminer.pipeline import synthetic_split
    from multiminer.data import SyntheticScenes, SyntheticShapes
    from multiminer.demo import DemoSettings
    from multiminer.pipeline import make_synthetic
    for data, cls, stride in (('synthetic', SyntheticScenes, 4), ('shapes', SyntheticShapes, 8)):
        c, m = tmp_path/f'c_{data}', tmp_path/f'm_{data}'
        syn = ['--data', data, '--n-images', 16, '--image-size', 32, '--quiet']
        assert run_cli('train-classifier', *syn, '--epochs', 1, '--out', c)[0] == 0
        settings = DemoSettings.for_args(n_classes=4, image_size=32, seed=0, data='scenes' if data == 'synthetic' else 'shapes')
        rec = read_run(c)
        assert rec['data']['kind'] == data
        assert rec['config'] == json.loads(json.dumps(asdict(replace(settings.classifier, epochs=1, num_workers=0))))
        assert rec['config']['small_stride'] == stride
        assert run_cli('mine', '--classifier', c, '--out', m, '--max-steps', 1, '--quiet')[0] == 0
        assert tuple(read_run(m)['config']['scales']) == settings.mining.scales
        spec = rec['data']
        ds = synthetic_split(spec)
        assert isinstance(ds, cls) and torch.equal(ds.images, make_synthetic(settings.data, 16, 4, 32, 0).images)
        assert torch.equal(synthetic_split(spec, 'val', 4).images, make_synthetic(settings.data, 4, 4, 32, 100_000).images)
    assert tuple(read_run(tmp_path/'m_synthetic')['config']['scales'])[0] == 32   # scenes: the first scale is the image size


def test_erase_then_pseudo_labels(tmp_path):
    "`multiminer erase`: fixed-step erasing with the demo's settings; its folder feeds pseudo-labels like a mining folder."
    from multiminer.baselines import fixed_erasing
    from multiminer.classifier import load_classifier
    from multiminer.demo import DemoSettings
    from multiminer.features import FeatureBank
    syn = ['--data', 'synthetic', '--n-images', 16, '--image-size', 32, '--quiet']
    assert run_cli('train-classifier', *syn, '--epochs', 1, '--out', tmp_path/'c')[0] == 0
    code, out, err = run_cli('erase', '--classifier', tmp_path/'c', '--out', tmp_path/'e', '--steps', 2, '--quiet')
    assert code == 0, err
    rec = read_run(tmp_path/'e')
    settings = DemoSettings.for_args(n_classes=4, image_size=32, seed=0)
    assert rec['stage'] == 'erase' and rec['finished'] and rec['config']['steps'] == 2
    assert tuple(rec['config']['scales']) == settings.erasing.scales and rec['config']['n_m'] == settings.erasing.n_m
    res, extra = load_mining_result(tmp_path/'e')
    # the same as fixed_erasing called directly on the classifier's features
    from multiminer.pipeline import synthetic_split
    ds = synthetic_split(rec['data'])
    clf = load_classifier(tmp_path/'c')
    cfg = settings.erasing; cfg.steps = 2
    er = fixed_erasing(clf.modulator, FeatureBank(clf.extractor, ds.images, cfg.scales), ds.labels, cfg, progress=False)
    assert torch.allclose(res.strength(), er.strength * (ds.labels > 0.5)[..., None, None], atol=1e-5)
    assert (res.steps == 2).all() and abs(res.mined_threshold - settings.bg_fixed_erasing) < 1e-9   # the demo's threshold for erasing
    summary = json.loads((tmp_path/'e'/'summary.json').read_text())      # valid JSON (no NaN)
    assert summary['steps'] == 2 and summary['history'][0]['modulator_loss'] is None
    assert run_cli('pseudo-labels', '--mining', tmp_path/'e', '--out', tmp_path/'p', '--quiet')[0] == 0
    assert abs(read_run(tmp_path/'p')['config']['bg_threshold'] - settings.bg_fixed_erasing) < 1e-9
    assert run_cli('pseudo-labels', '--mining', tmp_path/'e', '--out', tmp_path/'pc', '--crf', '--quiet')[0] == 0
    assert read_run(tmp_path/'pc')['config']['bg_threshold'] == DemoSettings.__dataclass_fields__['bg_fixed_erasing_crf'].default
    import shutil
    x = shutil.copytree(tmp_path/'c', tmp_path/'x'); (x/'mining_result.pt').write_bytes(b'')   # a classifier folder
    code, _, err = run_cli('pseudo-labels', '--mining', x, '--out', tmp_path/'p2')
    assert code == 2 and 'not of `multiminer mine` or `multiminer erase`' in err, err
    code, _, err = run_cli('erase', '--classifier', tmp_path/'c', '--out', tmp_path/'e')
    assert code == 2 and 'finished `erase` run' in err and '--force' in err


def test_mine_at_one_fixed_scale(tmp_path):
    "`mine --scales R`: every step at one input scale (Table 2's rows); a schedule that is not increasing is refused; --quiet prints no step lines."
    syn = ['--data', 'shapes', '--n-images', 16, '--image-size', 32]
    assert run_cli('train-classifier', *syn, '--epochs', 1, '--out', tmp_path/'c', '--quiet')[0] == 0
    code, _, err = run_cli('mine', '--classifier', tmp_path/'c', '--scales', 40, '--max-steps', 2, '--out', tmp_path/'m', '--quiet')
    assert code == 0 and 'step 1' not in err
    hist = json.loads((tmp_path/'m'/'summary.json').read_text())['history']
    assert [h['scale'] for h in hist] == [40] * len(hist) and read_run(tmp_path/'m')['config']['scales'] == [40]
    from multiminer.classifier import load_classifier
    stride = load_classifier(tmp_path/'c').extractor.stride
    assert load_mining_result(tmp_path/'m')[0].merged.shape[-1] == -(-40 // stride)   # the maps of a 40-px input
    code, _, err = run_cli('mine', '--classifier', tmp_path/'c', '--scales', 40, 32, '--out', tmp_path/'m2', '--quiet')
    assert code == 2 and '--scales 40 32' in err and 'increasing' in err and not (tmp_path/'m2').exists()

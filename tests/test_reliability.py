"Issue 13: inputs that do not belong together, half-written or stale outputs, and user errors are refused with exit 2."
import contextlib, io, json, shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from multiminer import cli
from multiminer.cli import main
from multiminer.runtime import read_run
from multiminer.runtime import file_sha256
from cli_helpers import run_cli, ok, _one_thread
from multiminer.data import make_voc_fixture

SYN = ['--data', 'synthetic', '--n-images', 16, '--image-size', 32]


def refused(needles, *argv):
    "Run the command; assert exit 2, no traceback, and an error line holding every needle; return stderr."
    code, out, err = run_cli(*argv)
    assert code == 2, (code, out, err)
    lines = [l for l in err.splitlines() if l.startswith(f'multiminer {argv[0]}: error: ')]
    assert 'Traceback' not in err and len(lines) == 1, err    # argparse prints its usage above the error line
    last = lines[0]
    for n in ([needles] if isinstance(needles, str) else needles): assert n in last, (n, err)
    return err


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
    "A finished synthetic chain: classifier c, mining m, pseudo masks p, segmentation s (16 images of 32 px)."
    t = tmp_path_factory.mktemp('chain')
    ok('train-classifier', *SYN, '--epochs', 1, '--out', t/'c')
    ok('mine', '--classifier', t/'c', '--out', t/'m', '--max-steps', 1)
    ok('pseudo-labels', '--mining', t/'m', '--out', t/'p')
    ok('train-seg', '--pseudo', t/'p', '--out', t/'s', '--epochs', 1)
    return t


def copy(src, dst):
    shutil.copytree(src, dst); return dst


# --- provenance: what each run.json records -------------------------------------------------------------

def test_run_json_records_provenance(chain):
    c, m, p, s = (read_run(chain/k) for k in 'cmps')
    assert all(r['finished'] is True for r in (c, m, p, s))
    assert c['outputs'] == {'classifier.pt': file_sha256(chain/'c'/'classifier.pt')}
    assert m['inputs']['classifier']['files'] == c['outputs'] and m['config']['max_steps'] == 1
    assert p['inputs']['mining']['files'] == m['outputs'] and s['inputs']['pseudo']['files'] == p['outputs']
    assert c['data_fingerprint'] == m['data_fingerprint'] == p['data_fingerprint'] == s['data_fingerprint']
    assert c['config']['batch_size'] == 32 and s['config']['epochs'] == 1


# --- inputs that do not belong together -----------------------------------------------------------------

@pytest.mark.parametrize('opt, needle', [(['--seed', 5], 'seed: 0 then, 5 now'),
                                         (['--n-classes', 5], 'n_classes: 4 then, 5 now'),
                                         (['--n-classes', 3], 'n_classes: 4 then, 3 now'),
                                         (['--n-images', 24], 'n_images: 16 then, 24 now')])
def test_train_seg_refuses_other_images(chain, tmp_path, opt, needle):
    refused(['not the images --pseudo', needle], 'train-seg', '--pseudo', chain/'p', *opt, '--out', tmp_path/'s')
    assert not (tmp_path/'s').exists()


def test_mine_refuses_other_input_size(chain, tmp_path):
    refused(['trained on 32 px inputs, not 48 px'], 'mine', '--classifier', chain/'c', '--image-size', 48,
            '--out', tmp_path/'m')


def test_mine_resume_refuses_another_classifier(chain, tmp_path):
    ok('train-classifier', *SYN, '--epochs', 2, '--out', tmp_path/'c2')    # the same classes, other weights
    m = copy(chain/'m', tmp_path/'m')
    before = (m/RUN).read_text()
    refused(['cannot --resume', 'classifier.pt'], 'mine', '--classifier', tmp_path/'c2', '--out', m, '--resume',
            '--max-steps', 2)
    assert (m/RUN).read_text() == before


def test_train_seg_resume_refuses_other_pseudo_masks(chain, tmp_path):
    ok('pseudo-labels', '--mining', chain/'m', '--out', tmp_path/'p2', '--bg-threshold', 0.3)
    s = copy(chain/'s', tmp_path/'s')
    refused(['cannot --resume', 'pseudo_masks.pt'], 'train-seg', '--pseudo', tmp_path/'p2', '--out', s, '--resume',
            '--epochs', 1)


@pytest.mark.parametrize('opt, needle', [(['--batch-size', 8], 'batch_size: 32 then, 8 now'),
                                         (['--seed', 3], 'seed: 0 then, 3 now'),
                                         (['--n-images', 20], 'data_fingerprint')])
def test_train_classifier_resume_refuses_other_settings(chain, tmp_path, opt, needle):
    argv = dict(zip(SYN[::2], SYN[1::2])); argv.update(dict(zip(opt[::2], opt[1::2])))
    c = copy(chain/'c', tmp_path/'c')
    before = (c/RUN).read_text()
    refused(['cannot --resume', needle], 'train-classifier', *[x for kv in argv.items() for x in kv], '--epochs', 2,
            '--out', c, '--resume')
    assert (c/RUN).read_text() == before            # run.json still says what the checkpoint was made with


def test_more_epochs_resume_is_allowed(chain, tmp_path):
    c = copy(chain/'c', tmp_path/'c')
    ok('train-classifier', *SYN, '--epochs', 2, '--out', c, '--resume')
    assert read_run(c)['config']['epochs'] == 2 and read_run(c)['finished'] is True


RUN = 'run.json'


# --- half-written or stale outputs ----------------------------------------------------------------------

def test_failed_mine_resume_keeps_the_finished_run_until_its_result_changes(chain, tmp_path):
    """A `--resume` taking a finished mining further that fails before it rewrites mining_result.pt leaves that
    finished run (its outputs are the ones run.json records); one that fails after leaves it unfinished, refused downstream."""
    m = copy(chain/'m', tmp_path/'m')
    with mock.patch('multiminer.mining.MultiMiner.step', side_effect=RuntimeError('killed')):
        with pytest.raises(RuntimeError): run_cli('mine', '--classifier', chain/'c', '--out', m, '--resume',
                                                  '--max-steps', 3, '--quiet')
    assert read_run(m)['finished'] is True
    real = cli.write_run
    def killed_before_the_record(*a, **k):
        if k.get('finished'): raise RuntimeError('killed')
        return real(*a, **k)
    with mock.patch.object(cli, 'write_run', killed_before_the_record):
        with pytest.raises(RuntimeError): run_cli('mine', '--classifier', chain/'c', '--out', m, '--resume',
                                                  '--max-steps', 3, '--quiet')
    assert read_run(m)['finished'] is False
    refused(['not finished', 'mine'], 'pseudo-labels', '--mining', m, '--out', tmp_path/'p')


def test_stale_output_is_refused(chain, tmp_path):
    c = copy(chain/'c', tmp_path/'c')
    torch.save(torch.load(c/'classifier.pt', weights_only=True) | {'epoch': 99}, c/'classifier.pt')
    refused(['classifier.pt changed after `multiminer train-classifier` finished'], 'mine', '--classifier', c,
            '--out', tmp_path/'m')


def test_finished_folders_are_kept(chain, tmp_path):
    refused(['finished `train-seg` run', '--resume', '--force'], 'train-seg', '--pseudo', chain/'p', '--out', chain/'s')
    refused(['finished `pseudo-labels` run', '--force'], 'pseudo-labels', '--mining', chain/'m', '--out', chain/'p')
    d = tmp_path/'demo'; d.mkdir(); (d/'metrics.json').write_text('{}'); (d/RUN).write_text(json.dumps(dict(stage='demo', finished=True)))
    refused(['finished run (metrics.json)', '--resume', '--force'], 'demo', '--out', d, '--n-images', 16,
            '--image-size', 32)


def test_a_stage_never_writes_into_another_stages_folder(chain):
    before = (chain/'c'/RUN).read_text()
    refused('is the --classifier folder', 'mine', '--classifier', chain/'c', '--out', chain/'c')
    refused("holds the output of `multiminer pseudo-labels`", 'mine', '--classifier', chain/'c', '--out', chain/'p')
    refused("holds the output of `multiminer train-classifier`", 'evaluate', '--seg', chain/'s', '--out', chain/'c')
    assert (chain/'c'/RUN).read_text() == before


# --- user errors: exit 2, named, before any work --------------------------------------------------------

def test_out_is_a_file(chain, tmp_path):
    f = tmp_path/'file'; f.write_text('x')
    for argv in (['train-classifier', *SYN], ['mine', '--classifier', chain/'c'], ['pseudo-labels', '--mining', chain/'m'],
                 ['train-seg', '--pseudo', chain/'p'], ['evaluate', '--seg', chain/'s']):
        refused(f'--out {f} exists and is a file', *argv, '--out', f)
    with mock.patch('multiminer.segmentation.evaluate', side_effect=AssertionError('scored before the check')):
        refused('is a file', 'evaluate', '--seg', chain/'s', '--out', f)


@pytest.mark.parametrize('argv, needle', [
    (['train-classifier', '--data', 'synthetic', '--image-size', 36], 'not a multiple of 8'),
    (['train-classifier', '--data', 'synthetic', '--seed', '99999999999999999999'], 'in 0..4294967295'),
    (['demo', '--seed', '99999999999999999999'], 'in 0..4294967295'),
    (['train-classifier', '--data', 'synthetic', '--n-images', 10**12], 'more than the'),
])
def test_bad_values_before_any_work(tmp_path, argv, needle):
    refused(needle, *argv, '--out', tmp_path/'o')
    assert not (tmp_path/'o').exists()


def test_empty_saliency_folder_counts_every_map(chain, tmp_path):
    (tmp_path/'sal').mkdir()
    refused('16 of 16 saliency maps are missing', 'pseudo-labels', '--mining', chain/'m', '--out', tmp_path/'p',
            '--saliency', tmp_path/'sal')


def test_corrupt_checkpoints_are_named(chain, tmp_path):
    c = copy(chain/'c', tmp_path/'c')
    (c/'classifier.pt').write_bytes(b'PK\x03\x04 not a checkpoint')
    refused(['classifier.pt changed after'], 'mine', '--classifier', c, '--out', tmp_path/'m')     # the hash first
    rec = read_run(c); rec['outputs']['classifier.pt'] = file_sha256(c/'classifier.pt')
    (c/RUN).write_text(json.dumps(rec))                                                        # a consistent damage
    refused([f"{c/'classifier.pt'} cannot be read", 'damaged'], 'mine', '--classifier', c, '--out', tmp_path/'m')
    refused([f"{c/'classifier.pt'} cannot be read"], 'train-classifier', *SYN, '--epochs', 2, '--out', c, '--resume')
    m = copy(chain/'m', tmp_path/'m')
    (m/'mining_state.pt').write_bytes((m/'mining_state.pt').read_bytes()[:100])
    refused([f"{m/'mining_state.pt'} cannot be read"], 'mine', '--classifier', chain/'c', '--out', m, '--resume')
    s = copy(chain/'s', tmp_path/'s')
    (s/'checkpoint.pt').write_bytes(b'')
    refused([f"{s/'checkpoint.pt'} cannot be read"], 'train-seg', '--pseudo', chain/'p', '--out', s, '--resume',
            '--epochs', 1)


# --- damaged VOC trees ----------------------------------------------------------------------------------

VOC = ['--preset', 'synthetic', '--image-size', 32, '--workers', 0]


@pytest.fixture(scope='module')
def voc_clf(tmp_path_factory):
    t = tmp_path_factory.mktemp('voc')
    make_voc_fixture(t/'D1')
    ok('train-classifier', '--data', 'voc', '--voc-root', t/'D1', *VOC, '--epochs', 1, '--out', t/'c')
    return t


def test_truncated_jpeg_is_named(tmp_path):
    make_voc_fixture(tmp_path/'D')
    jpg = tmp_path/'D'/'VOCdevkit'/'VOC2012'/'JPEGImages'/'a2.jpg'
    jpg.write_bytes(jpg.read_bytes()[:300])
    refused([f'cannot read the image {jpg}', 'truncated'], 'train-classifier', '--data', 'voc', '--voc-root',
            tmp_path/'D', *VOC, '--epochs', 1, '--out', tmp_path/'c')


def test_mask_of_another_size_is_named_by_mine(voc_clf, tmp_path):
    d = copy(voc_clf/'D1', tmp_path/'D')
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(d/'VOCdevkit'/'VOC2012'/'SegmentationClass'/'a1.png')
    # the fingerprint test refuses the changed tree first; past it, the size test itself names the image
    refused('not the images --classifier', 'mine', '--classifier', voc_clf/'c', '--voc-root', d, '--out', tmp_path/'m')
    with mock.patch('multiminer.cli.check_same_data'):
        refused(['image a1: its mask', 'a1.png', '(40, 50)', '(40, 56)'], 'mine', '--classifier', voc_clf/'c',
                '--voc-root', d, '--out', tmp_path/'m', '--max-steps', 1)
    refused(['image a1: its mask'], 'train-classifier', '--data', 'voc', '--voc-root', d, *VOC, '--epochs', 1,
            '--out', tmp_path/'c')


def test_voc_data_under_another_root(voc_clf, tmp_path):
    make_voc_fixture(tmp_path/'other', seed=1)
    refused(['not the images --classifier', 'fingerprint'], 'mine', '--classifier', voc_clf/'c', '--voc-root',
            tmp_path/'other', '--out', tmp_path/'m', '--max-steps', 1)
    moved = copy(voc_clf/'D1', tmp_path/'moved')       # the same files elsewhere are the same data
    ok('mine', '--classifier', voc_clf/'c', '--voc-root', moved, '--out', tmp_path/'m', '--max-steps', 1)
    assert read_run(tmp_path/'m')['data']['voc_root'] == str(moved.resolve())


def _fail_at(n):
    "A stand-in for pipeline.image_pseudo_mask (what `pseudo-labels` runs on each image) that fails on its n-th image."
    from multiminer import pipeline
    calls, real = [], pipeline.image_pseudo_mask
    def pseudo_one(*a):
        calls.append(1)
        if len(calls) == n: raise RuntimeError(f'image {n} failed')
        return real(*a)
    return mock.patch.object(pipeline, 'image_pseudo_mask', pseudo_one)


def test_pseudo_labels_failing_part_way(voc_clf, tmp_path):
    ok('mine', '--classifier', voc_clf/'c', '--out', tmp_path/'m', '--max-steps', 1)
    p = tmp_path/'p'
    with _fail_at(6), pytest.raises(RuntimeError):
        run_cli('pseudo-labels', '--mining', tmp_path/'m', '--out', p, '--quiet')
    assert not p.exists()           # five masks were written in masks.partial: removed with the new folder
    refused(['no such folder'], 'train-seg', '--pseudo', p, '--out', tmp_path/'s')
    ok('pseudo-labels', '--mining', tmp_path/'m', '--out', p)
    assert len(list((p/'masks').glob('*.png'))) == 6 and not (p/'masks.partial').exists()
    ok('train-seg', '--pseudo', p, '--out', tmp_path/'s', '--epochs', 1, '--workers', 0)


def test_failure_in_a_new_folder_leaves_nothing(chain, tmp_path):
    with _fail_at(3), pytest.raises(RuntimeError):
        run_cli('pseudo-labels', '--mining', chain/'m', '--out', tmp_path/'p', '--quiet')
    assert not (tmp_path/'p').exists()


# --- load_checkpoint names the file whatever torch's error was ------------------------------------------

@pytest.mark.parametrize('damage', ['empty', 'half', 'zip junk', 'text', 'bytes'])
def test_load_checkpoint_names_a_damaged_file(tmp_path, damage):
    from multiminer.models import load_checkpoint, CheckpointError
    good = tmp_path/'good.pt'; torch.save(dict(w=torch.ones(4), config=dict(a=1)), good)
    data = good.read_bytes()
    content = {'empty': b'', 'half': data[:len(data) // 2], 'zip junk': b'PK\x03\x04 junk', 'text': b'hello\n',
               'bytes': bytes(range(256)) * 4}[damage]
    p = tmp_path/'ck.pt'; p.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"cannot read the checkpoint '{p}'"): load_checkpoint(p)


def test_load_checkpoint_names_a_missing_file_or_a_folder(tmp_path):
    from multiminer.models import load_checkpoint
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path/'none.pt'}'"): load_checkpoint(tmp_path/'none.pt')
    with pytest.raises(IsADirectoryError, match=f"'{tmp_path}'"): load_checkpoint(tmp_path)

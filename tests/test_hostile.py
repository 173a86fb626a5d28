"""Issue 13, checked independently: hand-edited run.json files, checkpoints of the wrong structure, damaged VOC trees,
symlinks and odd paths. Each case exits 2 with one error line that names the file (or runs, where the input is fine)."""
import json, shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from multiminer.runtime import read_run, output_sha256, RUN_MAX_BYTES
from multiminer.data import make_voc_fixture, VOC_PALETTE
from cli_helpers import run_cli, ok, refused, _one_thread

SYN = ['--data', 'shapes', '--n-images', 16, '--image-size', 32]
VOC = ['--preset', 'synthetic', '--image-size', 32, '--workers', 0]
RUN = 'run.json'




def copy(src, dst): shutil.copytree(src, dst, symlinks=True); return Path(dst)

def rehash(folder):
    "Make run.json's output hashes match the files again: the damage is then consistent, only the content can tell."
    rec = read_run(folder); rec['outputs'] = {k: output_sha256(Path(folder)/k) for k in rec['outputs']}
    (Path(folder)/RUN).write_text(json.dumps(rec))

def edit_run(folder, fn):
    p = Path(folder)/RUN; rec = json.loads(p.read_text()); fn(rec); p.write_text(json.dumps(rec))

def resave(path, fn):
    "Replace a checkpoint with fn(its content): valid weights_only data, of another structure."
    torch.save(fn(torch.load(path, weights_only=True)), path)

def palette_png(a, path):
    im = Image.fromarray(np.asarray(a, np.uint8)); im.putpalette(VOC_PALETTE.flatten().tolist()); im.save(path)


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    "A finished synthetic chain: c (classifier), m (mine --snapshots, 2 steps), p (pseudo masks), s (segmentation)."
    t = tmp_path_factory.mktemp('hostile_syn')
    ok('train-classifier', *SYN, '--epochs', 1, '--out', t/'c')
    ok('mine', '--classifier', t/'c', '--out', t/'m', '--max-steps', 2, '--snapshots')
    ok('pseudo-labels', '--mining', t/'m', '--out', t/'p')
    ok('train-seg', '--pseudo', t/'p', '--out', t/'s', '--epochs', 1)
    return t


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
    "A VOC fixture D and its chain vc, vm, vp, vs (synthetic-preset sizes)."
    t = tmp_path_factory.mktemp('hostile_voc')
    make_voc_fixture(t/'D')
    ok('train-classifier', '--data', 'voc', '--voc-root', t/'D', *VOC, '--epochs', 1, '--out', t/'vc')
    ok('mine', '--classifier', t/'vc', '--out', t/'vm', '--max-steps', 1)
    ok('pseudo-labels', '--mining', t/'vm', '--out', t/'vp')
    ok('train-seg', '--pseudo', t/'vp', '--out', t/'vs', '--epochs', 1, '--workers', 0)
    return t


# --- run.json edited by hand -----------------------------------------------------------------------------

@pytest.mark.parametrize('edit, needle', [
    (lambda r: r.update(finished='yes'), 'finished is "yes", not bool'),
    (lambda r: r.update(outputs=['classifier.pt']), 'outputs is ["classifier.pt"], not dict'),
    (lambda r: r.update(outputs={'/etc/passwd': '0' * 64}), "outputs names '/etc/passwd', not a file inside"),
    (lambda r: r.update(outputs={'../c/classifier.pt': '0' * 64}), "outputs names '../c/classifier.pt'"),
    (lambda r: r.update(outputs={'classifier.pt': 5}), 'outputs.classifier.pt is 5, not a sha256'),
    (lambda r: r.update(data=[1]), 'data is [1], not dict or null'),
    (lambda r: r.pop('data'), '(no data)'),
    (lambda r: r.pop('stage'), '(no stage)'),
    (lambda r: r['data'].update(kind='bogus'), 'data.kind is "bogus"'),
    (lambda r: r['data'].update(image_size='32'), 'data.image_size is "32", not int'),
    (lambda r: r['data'].update(n_classes=99), 'data.n_classes is 99, not in 1..20'),
    (lambda r: r.update(seed=-1), 'seed is -1'),
    (lambda r: r.update(preset='bogus'), 'preset is "bogus"'),
    (lambda r: r.update(input_size='32'), 'input_size is "32"'),
])
def test_edited_upstream_run_json(syn, tmp_path, edit, needle):
    c = copy(syn/'c', tmp_path/'c'); edit_run(c, edit)
    refused([c/RUN, needle, 'edited or damaged'], 'mine', '--classifier', c, '--out', tmp_path/'o', '--max-steps', 1)
    assert not (tmp_path/'o').exists()


@pytest.mark.parametrize('text, needle', [(b'[1, 2]', 'a JSON list, not an object'), (b'"x"', 'a JSON str'),
                                          (b'null', 'a JSON NoneType'), (b'[' * 100000 + b']' * 100000, 'RecursionError')])
def test_run_json_that_is_not_an_object(syn, tmp_path, text, needle):
    c = copy(syn/'c', tmp_path/'c'); (c/RUN).write_bytes(text)
    refused([c/RUN, needle], 'mine', '--classifier', c, '--out', tmp_path/'o')


def test_huge_run_json_is_not_read(syn, tmp_path):
    c = copy(syn/'c', tmp_path/'c')
    with open(c/RUN, 'r+b') as f: f.seek(RUN_MAX_BYTES + 1); f.write(b' ')      # sparse: nothing big is written
    refused([c/RUN, 'MiB, not a few kB'], 'mine', '--classifier', c, '--out', tmp_path/'o')


def test_output_read_downstream_must_be_hashed(syn, tmp_path):
    c = copy(syn/'c', tmp_path/'c')
    edit_run(c, lambda r: r.update(outputs={'other.json': r['outputs']['classifier.pt']}))
    refused([c/RUN, 'records no hash of classifier.pt'], 'mine', '--classifier', c, '--out', tmp_path/'o')


def test_edited_run_json_in_out_refused_on_resume(syn, tmp_path):
    m = copy(syn/'m', tmp_path/'m'); edit_run(m, lambda r: r.update(config=[1]))
    refused([m/RUN, 'config is [1], not dict'], 'mine', '--classifier', syn/'c', '--out', m, '--resume', '--max-steps', 3)


def test_edited_steps_run_and_unhashed_snapshot(syn, tmp_path):
    m = copy(syn/'m', tmp_path/'m'); edit_run(m, lambda r: r.update(steps_run='2'))
    refused([m/RUN, 'steps_run is "2", not int'], 'pseudo-labels', '--mining', m, '--out', tmp_path/'o', '--steps', 1)
    m2 = copy(syn/'m', tmp_path/'m2'); edit_run(m2, lambda r: r['outputs'].pop('snapshots/step_1.pt'))
    refused([m2/RUN, 'no hash of snapshots/step_1.pt'], 'pseudo-labels', '--mining', m2, '--out', tmp_path/'o', '--steps', 1)


# --- checkpoints of the wrong structure (valid weights_only data; hashes made consistent) ----------------

def _no(key): return lambda d: {k: v for k, v in d.items() if k != key}
def _zeros(key): return lambda d: d | {key: {k: torch.zeros(2) for k in d[key]}}

@pytest.mark.parametrize('fname, change, argv, needle', [
    ('c/classifier.pt', lambda d: [1, 2], ['mine', '--classifier', '{d}'], 'TypeError'),
    ('c/classifier.pt', _no('model'), ['mine', '--classifier', '{d}'], "KeyError: 'model'"),
    ('c/classifier.pt', _zeros('model'), ['mine', '--classifier', '{d}'], 'size mismatch'),
    ('c/classifier.pt', lambda d: d | {'n_classes': 7}, ['mine', '--classifier', '{d}'], 'size mismatch'),
    ('c/classifier.pt', lambda d: d | {'model': {k: v * float('nan') if v.is_floating_point() else v
                                                 for k, v in d['model'].items()}},
     ['mine', '--classifier', '{d}'], 'non-finite weights'),
    ('m/mining_result.pt', lambda d: d | {'objects': d['objects'] + 100}, ['pseudo-labels', '--mining', '{d}'],
     'objects name images or classes outside 0..15'),
    ('m/mining_result.pt', _no('labels'), ['pseudo-labels', '--mining', '{d}'], "KeyError: 'labels'"),
    ('m/mining_result.pt', lambda d: d | {'merged': torch.zeros(2, 3)}, ['pseudo-labels', '--mining', '{d}'], 'merged (2, 3)'),
    ('m/snapshots/step_1.pt', lambda d: [1], ['pseudo-labels', '--steps', 1, '--mining', '{d}'], 'a list, not a dict'),
    ('m/snapshots/step_1.pt', lambda d: d | {'steps': torch.zeros(1)}, ['pseudo-labels', '--steps', 1, '--mining', '{d}'],
     'is not step 1'),
    ('p/pseudo_masks.pt', lambda t: t.float(), ['train-seg', '--epochs', 1, '--pseudo', '{d}'], 'not a uint8 tensor'),
    ('p/pseudo_masks.pt', lambda t: torch.full_like(t, 99), ['train-seg', '--epochs', 1, '--pseudo', '{d}'], 'it holds 99'),
    ('p/pseudo_masks.pt', lambda t: {'a': t}, ['train-seg', '--epochs', 1, '--pseudo', '{d}'], 'dict'),
    ('s/model.pt', _no('config'), ['evaluate', '--n-val', 4, '--seg', '{d}'], "KeyError: 'config'"),
    ('s/model.pt', _zeros('model'), ['evaluate', '--n-val', 4, '--seg', '{d}'], 'size mismatch'),
])
def test_wrong_structure_is_named(syn, tmp_path, fname, change, argv, needle):
    folder, rel = fname.split('/', 1)
    d = copy(syn/folder, tmp_path/folder); resave(d/rel, change); rehash(d)
    argv = [str(d) if a == '{d}' else a for a in argv]
    refused([d/rel, needle, 'does not hold what' if 'non-finite' not in needle and 'not step' not in needle else ''],
            *argv, '--out', tmp_path/'o')
    assert not (tmp_path/'o').exists()


@pytest.mark.parametrize('folder, rel, change, argv, needle', [
    ('c', 'classifier.pt', _no('optimizer'), ['train-classifier', *SYN, '--epochs', 2], "KeyError: 'optimizer'"),
    ('c', 'classifier.pt', lambda d: d | {'epoch': 'x'}, ['train-classifier', *SYN, '--epochs', 2], 'epoch "x"'),
    ('m', 'mining_state.pt', lambda d: d | {'modulators': [{k: torch.zeros(1) for k in d['modulators'][0]}]},
     ['mine', '--classifier', '{c}', '--max-steps', 3, '--snapshots'], 'size mismatch'),
    ('m', 'mining_state.pt', _no('state'), ['mine', '--classifier', '{c}', '--max-steps', 3, '--snapshots'], "KeyError: 'state'"),
    ('s', 'checkpoint.pt', lambda d: [1], ['train-seg', '--pseudo', '{p}', '--epochs', 1], 'a list, not a dict'),
    ('s', 'checkpoint.pt', _no('scaler'), ['train-seg', '--pseudo', '{p}', '--epochs', 1], "KeyError: 'scaler'"),
])
def test_resume_from_a_checkpoint_of_the_wrong_structure(syn, tmp_path, folder, rel, change, argv, needle):
    d = copy(syn/folder, tmp_path/folder); resave(d/rel, change)
    edit_run(d, lambda r: r.update(finished=False))
    before = (d/RUN).read_text()
    argv = [str(syn/'c') if a == '{c}' else str(syn/'p') if a == '{p}' else a for a in argv]
    refused([d/rel, needle, 'does not hold what'], *argv, '--out', d, '--resume')
    assert (d/RUN).read_text() == before             # refused before the run record was touched


# --- damaged VOC trees -------------------------------------------------------------------------------------

def _tree(voc, tmp_path, damage):
    d = copy(voc/'D', tmp_path/'D'); v = d/'VOCdevkit'/'VOC2012'; damage(v, d/'benchmark_RELEASE'/'dataset')
    return d, v

def _replace_with_dir(p): p.unlink(); p.mkdir()

def _mask_value(v, value):
    a = np.array(Image.open(v/'SegmentationClass'/'a1.png')); a[a == a[(a != 0) & (a != 255)].max()] = value
    palette_png(a, v/'SegmentationClass'/'a1.png')

@pytest.mark.parametrize('damage, needles', [
    (lambda v, b: (v/'ImageSets/Segmentation/train.txt').write_text('a1\na2\na3\nzz9\n'),
     ['1 of 7 images', 'JPEGImages/zz9.jpg', 'train.txt', 'remove their ids']),
    (lambda v, b: _replace_with_dir(v/'JPEGImages'/'a1.jpg'), ['1 of 6 images', 'JPEGImages/a1.jpg']),
    (lambda v, b: (v/'SegmentationClass'/'a1.png').unlink(), ['1 of 6 masks', 'SegmentationClass/a1.png']),
    (lambda v, b: (b/'cls'/'s1.mat').unlink(), ['1 of 6 masks', 'cls/s1.mat']),
    (lambda v, b: (v/'JPEGImages'/'a1.jpg').write_bytes(b''), ['cannot read the image', 'JPEGImages/a1.jpg']),
    (lambda v, b: Image.new('RGB', (4100, 1100)).save(v/'JPEGImages'/'a1.jpg'),
     ['JPEGImages/a1.jpg is 4100 x 1100 pixels', 'MAX_IMAGE_PIXELS', 'resize it']),
    (lambda v, b: (v/'ImageSets/Segmentation/train.txt').write_text('a1\na2\na1\n'),
     ['train.txt', "the id 'a1' is listed twice (lines 1 and 3)"]),
    (lambda v, b: (v/'ImageSets/Segmentation/train.txt').write_text('a1\n../../x\n'), ['train.txt, line 2', 'not an image id']),
    (lambda v, b: [(p).write_text('\n') for p in (v/'ImageSets/Segmentation/train.txt', b/'train.txt', b/'val.txt')],
     ["split 'train_aug' has no images", 'train.txt']),
    (lambda v, b: _mask_value(v, 30), ['SegmentationClass/a1.png holds 30', "values must be 0 (background), 1..20"]),
    (lambda v, b: _mask_value(v, 254), ['SegmentationClass/a1.png holds 254']),
    (lambda v, b: Image.open(v/'SegmentationClass'/'a1.png').convert('RGB').save(v/'SegmentationClass'/'a1.png'),
     ['SegmentationClass/a1.png has shape (40, 56, 3) (mode RGB)', 'class indices']),
    (lambda v, b: savemat(b/'cls'/'s1.mat', {'Other': np.zeros((4, 4))}), ['cls/s1.mat', 'not the struct GTcls']),
    (lambda v, b: savemat(b/'cls'/'s1.mat', {'GTcls': {'Segmentation': np.full((40, 56), 1.5)}}), ['cls/s1.mat holds 1.5']),
])
def test_damaged_voc_tree(voc, tmp_path, damage, needles):
    d, v = _tree(voc, tmp_path, damage)
    refused(needles, 'train-classifier', '--data', 'voc', '--voc-root', d, *VOC, '--epochs', 1, '--out', tmp_path/'o')
    assert not (tmp_path/'o').exists()


def test_list_with_crlf_blank_lines_and_spaces_is_read_as_meant(voc, tmp_path):
    d, v = _tree(voc, tmp_path, lambda v, b: (v/'ImageSets/Segmentation/train.txt').write_bytes(b' a1 \r\n\r\na2\r\na3\r\n\n'))
    ok('train-classifier', '--data', 'voc', '--voc-root', d, *VOC, '--epochs', 1, '--out', tmp_path/'o')
    assert read_run(tmp_path/'o')['data_fingerprint'] == read_run(voc/'vc')['data_fingerprint']   # the same 6 images


def test_empty_or_repeated_val_list_for_evaluate(voc, tmp_path):
    d, v = _tree(voc, tmp_path, lambda v, b: (v/'ImageSets/Segmentation/val.txt').write_text(''))
    refused(["split 'val' has no images", 'val.txt'], 'evaluate', '--seg', voc/'vs', '--voc-root', d, '--out', tmp_path/'o')
    (v/'ImageSets/Segmentation/val.txt').write_text('v1\nv1\nv2\n')
    refused(['val.txt', "'v1' is listed twice"], 'evaluate', '--seg', voc/'vs', '--voc-root', d, '--out', tmp_path/'o')


def test_unicode_and_spaces_in_paths(voc, tmp_path):
    d = copy(voc/'D', tmp_path/'dä tä ü')
    ok('train-classifier', '--data', 'voc', '--voc-root', d, *VOC, '--epochs', 1, '--out', tmp_path/'ö u t')
    assert read_run(tmp_path/'ö u t')['finished'] is True


# --- pseudo masks and saliency maps (VOC) ----------------------------------------------------------------

@pytest.mark.parametrize('damage, needles', [
    (lambda m: palette_png(np.full((40, 56), 30), m/'a1.png'), ['masks/a1.png holds 30', 'pseudo-labels']),
    (lambda m: palette_png(np.zeros((20, 20)), m/'a1.png'), ['masks/a1.png is (20, 20)', 'JPEGImages/a1.jpg is (40, 56)']),
    (lambda m: ((m/'a1.png').unlink(), (m/'a1.png').symlink_to(m/'a2.png')), ['masks/a1.png is a symbolic link']),
])
def test_damaged_pseudo_mask_pngs(voc, tmp_path, damage, needles):
    p = copy(voc/'vp', tmp_path/'p'); damage(p/'masks'); rehash(p)
    refused(needles, 'train-seg', '--pseudo', p, '--out', tmp_path/'o', '--epochs', 1, '--workers', 0)


def _saliency(folder, ids, size=(40, 56)):
    folder.mkdir()
    for n in ids: Image.fromarray(np.full(size, 200, np.uint8)).save(folder/f'{n}.png')
    return folder

@pytest.mark.parametrize('damage, needles', [
    (lambda s: Image.fromarray(np.full((20, 20), 200, np.uint8)).save(s/'a1.png'), ['a1.png is (20, 20) (H, W)', '(40, 56)']),
    (lambda s: Image.fromarray(np.full((40, 56), 40000, np.uint16)).save(s/'a1.png'), ['a1.png is a mode-I;16 image']),
    (lambda s: (s/'a1.png').write_text('junk'), ['saliency map', 'a1.png cannot be read']),
])
def test_damaged_saliency_maps(voc, tmp_path, damage, needles):
    s = _saliency(tmp_path/'sal', [p.stem for p in (voc/'vp'/'masks').glob('*.png')]); damage(s)
    refused([str(s)] + needles, 'pseudo-labels', '--mining', voc/'vm', '--out', tmp_path/'o', '--saliency', s)
    assert not (tmp_path/'o').exists()


def test_rgb_saliency_maps_are_read_as_grey(voc, tmp_path):
    s = _saliency(tmp_path/'sal', [p.stem for p in (voc/'vp'/'masks').glob('*.png')])
    Image.fromarray(np.full((40, 56, 3), 200, np.uint8)).save(s/'a1.png')
    ok('pseudo-labels', '--mining', voc/'vm', '--out', tmp_path/'o', '--saliency', s)


# --- symlinks and --out ------------------------------------------------------------------------------------

def test_out_symlinks_and_nesting(syn, tmp_path):
    (tmp_path/'dangling').symlink_to(tmp_path/'nowhere')
    refused([f"--out {tmp_path/'dangling'} is a symbolic link to {tmp_path/'nowhere'}", 'does not exist'],
            'mine', '--classifier', syn/'c', '--out', tmp_path/'dangling')
    (tmp_path/'to-c').symlink_to(syn/'c')
    refused(['is the --classifier folder'], 'mine', '--classifier', syn/'c', '--out', tmp_path/'to-c')
    (tmp_path/'to-p').symlink_to(syn/'p')
    refused(['holds the output of `multiminer pseudo-labels`'], 'mine', '--classifier', syn/'c', '--out', tmp_path/'to-p')
    refused([f"is inside the --classifier folder {syn/'c'}"], 'mine', '--classifier', syn/'c', '--out', syn/'c'/'sub')
    refused([f"is inside the --pseudo folder {syn/'p'}"], 'train-seg', '--pseudo', syn/'p', '--out', syn/'p'/'masks'/'s')
    assert not (syn/'c'/'sub').exists() and not (syn/'p'/'masks').exists()
    refused([f"{syn/'c'/'classifier.pt'} is a file", f"holds classifier.pt ({syn/'c'}"], 'mine', '--classifier',
            syn/'c'/'classifier.pt', '--out', tmp_path/'o')


def test_input_folder_through_a_symlink_is_fine(syn, tmp_path):
    (tmp_path/'m').symlink_to(syn/'m')
    ok('pseudo-labels', '--mining', tmp_path/'m', '--out', tmp_path/'p')

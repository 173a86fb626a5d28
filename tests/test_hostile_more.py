"""Reliability, further cases in the same families: damaged lock files, an `--out` inside a folder another run
holds, `--resume` that would shrink a finished run, split files with invisible characters, a full disk as torch
reports it, and masks too large to decode. Each ends with one message and exit 2, or runs as documented."""
import errno, json, os, shutil, socket
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from multiminer import cli
from multiminer.runtime import atomic_save, lock_path, out_lock, read_run
from multiminer.data import make_voc_fixture, VOC_PALETTE
from cli_helpers import run_cli, ok, refused, _one_thread

SYN = ['--data', 'shapes', '--n-images', 16, '--image-size', 32]
VOC = ['--data', 'voc', '--preset', 'synthetic', '--image-size', 32, '--workers', 0]




@pytest.fixture(scope='module')
def clf(tmp_path_factory):
    t = tmp_path_factory.mktemp('more_syn')
    ok('train-classifier', *SYN, '--epochs', 3, '--out', t/'c')
    ok('mine', '--classifier', t/'c', '--out', t/'m', '--max-steps', 3)
    return t


# --- one folder, one run: lock files --------------------------------------------------------------------

def _record(**kw): return json.dumps(dict(dict(pid=os.getpid(), host=socket.gethostname(), command='mine', started='x'), **kw))

@pytest.mark.parametrize('content', ['', 'garbage{', '[1, 2]', '{"pid": "12"}', _record(pid=-1), _record(pid=0),
                                     _record(pid=True), _record(host=None)],
                         ids=['empty', 'garbage', 'list', 'pid-string', 'pid-1', 'pid0', 'pid-bool', 'no-host'])
def test_a_damaged_lock_is_stale(tmp_path, content):
    "A lock file appears whole (it is linked once written), so one that is no record of a process holds nothing."
    lock_path(tmp_path/'o').write_text(content)
    ok('train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/'o')
    assert not lock_path(tmp_path/'o').exists() and read_run(tmp_path/'o')['finished']

def test_taking_over_a_stale_lock_never_removes_a_fresh_one(tmp_path):
    "Two processes find the same stale lock; the first takes it over and links its own. The second's takeover must not delete that one."
    from multiminer.runtime import _holder, _take_stale
    p = lock_path(tmp_path/'o'); p.write_text(_record(pid=2 ** 22 + 12345))
    stale, ino = _holder(p, inode=True)
    fresh = tmp_path/'fresh'; fresh.write_text(_record(command='fresh'))   # written while the stale one is there, as out_lock does
    p.unlink(); os.link(fresh, p); fresh.unlink()                # the first process's own lock, now in its place
    _take_stale(p, ino)                                           # the second process, late
    assert _holder(p)['command'] == 'fresh' and [q.name for q in tmp_path.iterdir()] == [p.name]
    _take_stale(p, _holder(p, inode=True)[1])                     # the file it read is the one there: removed
    assert not p.exists()

def test_a_lock_that_is_a_folder_is_named(tmp_path):
    lock_path(tmp_path/'o').mkdir()
    refused([lock_path(tmp_path/'o')], 'train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/'o')

def test_root_is_no_output_folder():
    refused(['--out /', 'root of the file system'], 'train-classifier', *SYN, '--epochs', 1, '--out', '/')

def test_a_long_multibyte_name_is_a_legal_folder(tmp_path):
    name = 'ä' * 125                                  # 250 bytes: a legal name; `.<name>.lock` would not be
    assert len(name.encode()) <= 255 and len(lock_path(tmp_path/name).name.encode()) <= 255
    ok('train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/name)

def test_out_inside_a_folder_another_run_holds(tmp_path):
    "A live holder of the enclosing folder (pid 1 always runs) refuses a stage writing below it, naming the folder."
    (tmp_path/'demo').mkdir(); lock_path(tmp_path/'demo').write_text(_record(pid=1, command='demo'))
    refused([tmp_path/'demo', 'process 1', 'multiminer demo'], 'train-classifier', *SYN, '--epochs', 1,
            '--out', tmp_path/'demo'/'classifier')
    assert not (tmp_path/'demo'/'classifier').exists()
    lock_path(tmp_path/'demo').write_text(_record(pid=2 ** 22 + 12345))   # its process is gone: nothing holds it
    ok('train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/'demo'/'classifier')

def test_our_own_enclosing_lock_does_not_refuse(tmp_path):
    with out_lock(tmp_path/'a', 'demo'):
        with out_lock(tmp_path/'a'/'b', 'mine') as p: assert p.exists()


def test_demo_force_never_empties_another_commands_folder(clf, tmp_path):
    "`demo --force` replaces a demo; a stage's folder, or one with files but no run.json, it refuses before any work."
    o = shutil.copytree(clf/'c', tmp_path/'c')
    refused(['holds the output of `multiminer train-classifier`', 'not a `multiminer demo` run'], 'demo', '--out', o, '--force')
    assert read_run(o)['stage'] == 'train-classifier' and (o/'classifier.pt').is_file()
    (tmp_path/'mine').mkdir(); (tmp_path/'mine'/'mining').mkdir(); (tmp_path/'mine'/'notes.txt').write_text('mine')
    refused(['files but no run.json'], 'demo', '--out', tmp_path/'mine', '--force')
    assert (tmp_path/'mine'/'mining').is_dir()

@pytest.mark.parametrize('where', ['out', 'out-below', 'voc-root'])
def test_a_loop_of_symbolic_links_is_named(tmp_path, where):
    (tmp_path/'a').symlink_to(tmp_path/'b'); (tmp_path/'b').symlink_to(tmp_path/'a')
    argv = (['--data', 'voc', '--voc-root', tmp_path/'a', '--out', tmp_path/'o'] if where == 'voc-root' else
            [*SYN, '--out', tmp_path/'a' if where == 'out' else tmp_path/'a'/'sub'])
    refused(['cannot follow this path', str(tmp_path/'a')], 'train-classifier', *argv, '--epochs', 1)

def test_an_empty_out_names_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(["the path '' is empty"], 'train-classifier', *SYN, '--epochs', 1, '--out', '')
    assert list(tmp_path.iterdir()) == []

def test_bench_never_writes_into_a_stages_folder(clf, tmp_path):
    o = shutil.copytree(clf/'c', tmp_path/'c')
    refused(['holds the output of `multiminer train-classifier`', 'folder of its own'], 'bench', '--quick', '--out', o)
    assert sorted(p.name for p in o.iterdir()) == ['classifier.pt', 'run.json']

# --- resume checks what it reuses -----------------------------------------------------------------------

def test_resume_with_fewer_epochs_than_trained(clf, tmp_path):
    o = shutil.copytree(clf/'c', tmp_path/'c')
    before = read_run(o)
    refused(['--epochs 1', 'already run 3', '--force'], 'train-classifier', *SYN, '--epochs', 1, '--out', o, '--resume')
    assert read_run(o) == before

def test_resume_with_fewer_steps_than_mined(clf, tmp_path):
    o = shutil.copytree(clf/'m', tmp_path/'m')
    steps = read_run(o)['steps_run']
    refused(['--max-steps 1', f'already run {steps}'], 'mine', '--classifier', clf/'c', '--out', o, '--max-steps', 1, '--resume')
    ok('mine', '--classifier', clf/'c', '--out', o, '--max-steps', 5, '--resume')   # going further is what --resume is for


@pytest.mark.parametrize('other', [['--n-images', 24], ['--seed', 7]], ids=['other-data', 'other-seed'])
def test_resume_refuses_another_runs_checkpoint(clf, tmp_path, other):
    "A classifier.pt copied in from a run on other data, or with another seed, is not this folder's: named, exit 2."
    argv = [*SYN, *other] if other[0] == '--seed' else ['--data', 'shapes', '--n-images', 24, '--image-size', 32]
    ok('train-classifier', *argv, '--epochs', 1, '--out', tmp_path/'other')
    o = shutil.copytree(clf/'c', tmp_path/'c')
    shutil.copy(tmp_path/'other'/'classifier.pt', o/'classifier.pt')
    rec = read_run(o); rec['finished'] = False; (o/'run.json').write_text(json.dumps(rec))   # an interrupted run: no hash to check
    refused(['classifier.pt', 'another run', 'seed' if other[0] == '--seed' else 'data_fingerprint'],
            'train-classifier', *SYN, '--epochs', 4, '--out', o, '--resume')

def test_resume_refuses_a_finished_checkpoint_changed_since(clf, tmp_path):
    o = shutil.copytree(clf/'c', tmp_path/'c')
    ck = torch.load(o/'classifier.pt', weights_only=True)
    first = next(k for k, v in ck['model'].items() if v.is_floating_point()); ck['model'][first].view(-1)[0] += 1
    torch.save(ck, o/'classifier.pt')
    refused(['classifier.pt changed after its run finished', '--force'], 'train-classifier', *SYN, '--epochs', 4, '--out', o, '--resume')

def test_mine_resume_refuses_another_runs_state(clf, tmp_path):
    "A mining_state.pt from mining another classifier's features: its inputs name another classifier.pt."
    ok('train-classifier', *SYN, '--epochs', 2, '--out', tmp_path/'c2')
    ok('mine', '--classifier', tmp_path/'c2', '--out', tmp_path/'m2', '--max-steps', 2)
    o = shutil.copytree(clf/'m', tmp_path/'m')
    shutil.copy(tmp_path/'m2'/'mining_state.pt', o/'mining_state.pt')
    refused(['mining_state.pt', 'another run', 'classifier'], 'mine', '--classifier', clf/'c', '--out', o, '--max-steps', 5, '--resume')

@pytest.mark.parametrize('fault', ['full-disk', 'ctrl-c'])
def test_a_finished_run_stays_finished_when_going_further_fails(clf, tmp_path, fault):
    "`--resume --epochs 5` of a finished 3-epoch run marks it unfinished while it trains; failing before a new checkpoint, it is the finished run it was."
    o = shutil.copytree(clf/'c', tmp_path/'c')
    before = read_run(o)
    error = OSError(errno.ENOSPC, 'No space left on device', str(o/'classifier.pt')) if fault == 'full-disk' else KeyboardInterrupt()
    with mock.patch.object(cli, 'train_classifier', side_effect=error):
        code, _, err = run_cli('train-classifier', *SYN, '--epochs', 5, '--out', o, '--resume', '--quiet')
    assert code == (2 if fault == 'full-disk' else 130) and 'Traceback' not in err, err
    assert read_run(o) == before
    ok('mine', '--classifier', o, '--out', tmp_path/'m', '--max-steps', 1)     # the next stage takes it as finished

def test_a_run_taken_further_stays_unfinished(clf, tmp_path):
    "Once a new checkpoint replaced the finished one, the folder holds neither run whole: it stays unfinished until resumed."
    o = shutil.copytree(clf/'c', tmp_path/'c')
    def one_more_epoch(*a, **k):
        ck = torch.load(o/'classifier.pt', weights_only=True); ck['epoch'] += 1; atomic_save(ck, o/'classifier.pt')
        raise OSError(errno.ENOSPC, 'No space left on device', str(o/'classifier.pt'))
    with mock.patch.object(cli, 'train_classifier', side_effect=one_more_epoch):
        code, _, err = run_cli('train-classifier', *SYN, '--epochs', 5, '--out', o, '--resume', '--quiet')
    assert code == 2 and read_run(o)['finished'] is False
    ok('train-classifier', *SYN, '--epochs', 5, '--out', o, '--resume')
    assert read_run(o)['finished'] and torch.load(o/'classifier.pt', weights_only=True)['epoch'] == 5


def test_one_evaluate_folder_evaluates_one_network(clf, tmp_path):
    "A second split goes beside the first only from the same --seg, unchanged: results of two networks never share a run.json."
    ok('pseudo-labels', '--mining', clf/'m', '--out', tmp_path/'p')
    for s in ('sa', 'sb'): ok('train-seg', '--pseudo', tmp_path/'p', '--out', tmp_path/s, '--epochs', 1)
    ok('evaluate', '--seg', tmp_path/'sa', '--out', tmp_path/'e', '--n-val', 8)
    refused(['not of --seg', str(tmp_path/'sa')], 'evaluate', '--seg', tmp_path/'sb', '--out', tmp_path/'e', '--split', 'train')
    refused(['not of --seg'], 'evaluate', '--seg', tmp_path/'sb', '--out', tmp_path/'e', '--n-val', 8, '--force')
    ok('evaluate', '--seg', tmp_path/'sa', '--out', tmp_path/'e', '--split', 'train')
    assert sorted(read_run(tmp_path/'e')['outputs']) == ['eval_train.json', 'eval_val.json']

def test_scales_too_large_for_memory_are_refused(clf, tmp_path, monkeypatch):
    "--scales has a bound (2048 px); within it, features that do not fit the memory are refused before any is extracted."
    refused(['--scales', 'in 8..2048', '100000'], 'mine', '--classifier', clf/'c', '--out', tmp_path/'m', '--scales', 100000)
    import multiminer.pipeline as pipeline
    monkeypatch.setattr(pipeline, 'available_memory', lambda: 2**30)
    refused(['scales 64 2048', 'GiB of memory', 'smaller'], 'mine', '--classifier', clf/'c', '--out', tmp_path/'m',
            '--scales', 64, 2048)
    assert not (tmp_path/'m').exists() or not any((tmp_path/'m').iterdir())

@pytest.mark.parametrize('key, value, folder, argv', [
    ('steps_run', -3, 'm', ['pseudo-labels', '--mining', '{d}']),
    ('input_size', 0, 'c', ['mine', '--classifier', '{d}', '--max-steps', 1])])
def test_run_json_numbers_out_of_range(clf, tmp_path, key, value, folder, argv):
    "Types were checked; a number no stage writes (a negative step count, a size of 0) is named as an edit too."
    d = shutil.copytree(clf/folder, tmp_path/folder)
    rec = read_run(d); rec[key] = value; (d/'run.json').write_text(json.dumps(rec))
    refused([d/'run.json', f'{key} is {value}', 'edited or damaged'], *[d if a == '{d}' else a for a in argv], '--out', tmp_path/'o')

def test_weights_the_network_would_ignore(tmp_path):
    "The synthetic preset's small networks train from scratch: ImageNet weights given to them are refused, not ignored."
    (tmp_path/'vgg16.pth').write_bytes(b'')
    refused(['--weights', 'would be ignored'], 'train-classifier', *SYN, '--weights', tmp_path/'vgg16.pth', '--out', tmp_path/'c')
    make_voc_fixture(tmp_path/'D')
    refused(['a folder, not a weights file'], 'train-classifier', '--preset', 'voc', '--voc-root', tmp_path/'D', '--weights', tmp_path,
            '--out', tmp_path/'c')

def test_n_val_too_large_names_n_val(clf, tmp_path):
    ok('pseudo-labels', '--mining', clf/'m', '--out', tmp_path/'p')
    ok('train-seg', '--pseudo', tmp_path/'p', '--out', tmp_path/'s', '--epochs', 1)
    refused(['--n-val 100000000', 'memory'], 'evaluate', '--seg', tmp_path/'s', '--out', tmp_path/'e', '--n-val', 100000000)

def test_train_classifier_refuses_another_configurations_checkpoint(clf, tmp_path):
    "What the demo's --resume relies on: a classifier.pt trained with another seed is refused, not resumed with a warning."
    from dataclasses import replace
    from multiminer.classifier import ClassifierConfig, train_classifier
    from multiminer.pipeline import stage_dataset
    o = shutil.copytree(clf/'c', tmp_path/'c')
    cfg = ClassifierConfig(**torch.load(o/'classifier.pt', weights_only=True)['config'])
    ds = stage_dataset(read_run(o)['data'])[0]
    with pytest.raises(ValueError, match="another configuration .*'seed'"):
        train_classifier(replace(cfg, seed=cfg.seed + 1, epochs=5), ds, out_dir=o, resume=True, progress=False)

@pytest.mark.parametrize('command', ['train-seg', 'demo'])
def test_force_over_a_damaged_run_json_keeps_another_stages_files(clf, tmp_path, command):
    "The damaged run.json no longer says whose folder it is; the files do: mine's outputs are neither train-seg's nor the demo's."
    o = shutil.copytree(clf/'m', tmp_path/'m'); (o/'run.json').write_text('{"stage": "mine", "fini')
    before = sorted(p.name for p in o.iterdir())
    if command == 'train-seg': ok('pseudo-labels', '--mining', clf/'m', '--out', tmp_path/'p')
    argv = ['train-seg', '--pseudo', tmp_path/'p', '--epochs', 1] if command == 'train-seg' else ['demo']
    refused(['run.json is damaged', 'not this'], *argv, '--out', o, '--force')
    assert sorted(p.name for p in o.iterdir()) == before

def test_world_size_that_is_no_number(tmp_path, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', 'x')
    refused(["WORLD_SIZE='x'", 'not a number'], 'train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/'c')

def test_an_interrupted_bench_leaves_no_folder(tmp_path):
    import multiminer.bench as bench
    def stopped(out, **kw): Path(out).mkdir(); (Path(out)/'bench_data.pt').write_bytes(b'x'); raise KeyboardInterrupt
    with mock.patch.object(bench, 'run_bench', stopped):
        code, _, err = run_cli('bench', '--quick', '--out', tmp_path/'b')
    assert code == 130 and not (tmp_path/'b').exists(), err

# --- split files ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def voc(tmp_path_factory):
    t = tmp_path_factory.mktemp('more_voc'); make_voc_fixture(t/'D'); return t

def _tree(voc, tmp_path):
    d = shutil.copytree(voc/'D', tmp_path/'D'); return d, d/'VOCdevkit'/'VOC2012'

@pytest.mark.parametrize('second', [b'\xef\xbb\xbfv2', 'v2\u200b'.encode(), b'v\x072'])
def test_val_id_with_an_invisible_character(voc, tmp_path, second):
    "A byte-order mark inside the file (two files joined), a zero-width space: the id would name no image, and its image would stay in training."
    d, v = _tree(voc, tmp_path)
    (v/'ImageSets/Segmentation/val.txt').write_bytes(b'v1\n' + second + b'\n')
    refused(['val.txt, line 2', 'invisible character'], 'train-classifier', *VOC, '--voc-root', d, '--epochs', 1,
            '--out', tmp_path/'o')

def test_val_id_that_names_no_image(voc, tmp_path):
    d, v = _tree(voc, tmp_path)
    (v/'ImageSets/Segmentation/val.txt').write_text('v1\nv2x\n')
    refused(["split 'val'", 'val.txt', 'v2x.jpg'], 'train-classifier', *VOC, '--voc-root', d, '--epochs', 1,
            '--out', tmp_path/'o')


# --- faults ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('message', ['basic_ios::clear: iostream error', 'unexpected pos 111872 vs 111768',
                                     '[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file'])
def test_a_full_disk_as_torch_reports_it(tmp_path, monkeypatch, message):
    def full(obj, f): Path(f).write_bytes(b'part'); raise RuntimeError(message)
    monkeypatch.setattr(torch, 'save', full)
    with pytest.raises(OSError) as e: atomic_save({'a': 1}, tmp_path/'x.pt')
    assert e.value.filename == str(tmp_path/'x.pt') and 'disk' in str(e.value)
    assert list(tmp_path.iterdir()) == []                      # no orphan temporary file

def test_other_runtime_errors_of_torch_save_are_not_disguised(tmp_path, monkeypatch):
    def bad(obj, f): raise RuntimeError('cannot pickle a generator')
    monkeypatch.setattr(torch, 'save', bad)
    with pytest.raises(RuntimeError, match='pickle'): atomic_save({'a': 1}, tmp_path/'x.pt')

def test_no_space_for_the_lock_names_the_path(tmp_path, monkeypatch):
    def full(self, *a, **k): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(Path, 'write_text', full)
    with pytest.raises(OSError) as e:
        with out_lock(tmp_path/'o', 'mine'): pass
    assert e.value.errno == errno.ENOSPC and str(tmp_path) in e.value.filename
    assert list(tmp_path.iterdir()) == []


# --- memory bounded by image size -----------------------------------------------------------------------

def test_a_mask_too_large_is_refused_from_its_header(voc, tmp_path):
    d, v = _tree(voc, tmp_path)
    im = Image.new('P', (3000, 3000)); im.putpalette(VOC_PALETTE.flatten().tolist()); im.save(v/'SegmentationClass'/'a1.png')
    refused(['SegmentationClass/a1.png', '3000 x 3000', 'MAX_IMAGE_PIXELS'], 'train-classifier', *VOC, '--voc-root', d,
            '--epochs', 1, '--out', tmp_path/'o')


# --- a damaged record, a pipe, a full disk in evaluate ---------------------------------------------------

def test_force_replaces_a_run_whose_record_is_damaged(clf, tmp_path):
    o = shutil.copytree(clf/'c', tmp_path/'c')
    (o/'run.json').write_text((o/'run.json').read_text()[:50])
    refused(['run.json is not valid JSON', 'with --force'], 'train-classifier', *SYN, '--epochs', 1, '--out', o, '--resume')
    ok('train-classifier', *SYN, '--epochs', 1, '--out', o, '--force')
    assert read_run(o)['finished']

def test_a_named_pipe_is_no_output_folder(tmp_path):
    os.mkfifo(tmp_path/'pipe')
    refused(['--out', 'is a named pipe'], 'train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/'pipe')

def test_evaluate_on_a_full_disk_leaves_the_new_folder_as_found(clf, tmp_path, monkeypatch):
    import multiminer.pipeline as pipeline
    s = tmp_path/'s'
    ok('pseudo-labels', '--mining', clf/'m', '--out', tmp_path/'p')
    ok('train-seg', '--pseudo', tmp_path/'p', '--out', s, '--epochs', 1)
    real = pipeline.write_run
    def full(out, command, *a, **k):
        if command == 'evaluate': raise OSError(errno.ENOSPC, 'No space left on device', str(Path(out)/'run.json'))
        return real(out, command, *a, **k)
    monkeypatch.setattr(pipeline, 'write_run', full)
    refused(['run.json', 'No space left'], 'evaluate', '--seg', s, '--out', tmp_path/'e', '--n-val', 8)
    assert not (tmp_path/'e').exists() or not any((tmp_path/'e').iterdir())
    monkeypatch.setattr(pipeline, 'write_run', real)
    ok('evaluate', '--seg', s, '--out', tmp_path/'e', '--n-val', 8)       # space again: the same command runs
    assert read_run(tmp_path/'e')['finished']


# --- a refused --force leaves the old run ----------------------------------------------------------------

def _listing(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(Path(folder).rglob('*'))}

@pytest.mark.parametrize('case', ['mine-saliency', 'mine-seed', 'classifier-weights'])
def test_a_refused_force_leaves_the_old_run(tmp_path, clf, case):
    "`--force` empties the folder only once every check has passed: a command refused before its run starts deletes nothing."
    src = clf/('c' if case.startswith('classifier') else 'm')
    shutil.copytree(src, tmp_path/'o'); before = _listing(tmp_path/'o')
    args = {'mine-saliency': ('mine', '--classifier', clf/'c', '--saliency', tmp_path/'none'),
            'mine-seed': ('mine', '--classifier', clf/'c', '--seed', 5),
            'classifier-weights': ('train-classifier', *SYN, '--epochs', 1, '--weights', tmp_path/'x.pth')}[case]
    refused([], *args, '--out', tmp_path/'o', '--force')
    assert _listing(tmp_path/'o') == before
    from multiminer.runtime import REPLACED
    assert not REPLACED


def _saliency(folder, n, cols):
    folder.mkdir()
    for i in range(n):
        a = np.zeros((32, 32), np.uint8); a[:, :cols] = 255; Image.fromarray(a).save(folder/f'{i:06d}.png')

def test_mine_resumes_only_with_the_saliency_it_started_with(tmp_path, clf):
    "The saliency maps are one of mine's inputs: other maps, or the same folder edited, are refused on --resume."
    _saliency(tmp_path/'sa', 16, 32); _saliency(tmp_path/'sb', 16, 16)
    ok('mine', '--classifier', clf/'c', '--out', tmp_path/'m', '--saliency', tmp_path/'sa', '--max-steps', 1)
    refused(['inputs.saliency'], 'mine', '--classifier', clf/'c', '--out', tmp_path/'m', '--saliency', tmp_path/'sb',
            '--max-steps', 3, '--resume')
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path/'sa'/'000003.png')        # the same folder, edited
    refused(['inputs.saliency'], 'mine', '--classifier', clf/'c', '--out', tmp_path/'m', '--saliency', tmp_path/'sa',
            '--max-steps', 3, '--resume')
    assert read_run(tmp_path/'m')['finished'] is True


def test_an_input_replaced_while_a_stage_reads_it_is_named(tmp_path, clf):
    "pseudo-labels --force while train-seg reads that folder: train-seg ends with exit 2 and is not marked finished."
    ok('pseudo-labels', '--mining', clf/'m', '--out', tmp_path/'p')
    real = cli.train_segmentation
    def train_then_replace(*a, **kw):
        net = real(*a, **kw)
        ok('pseudo-labels', '--mining', clf/'m', '--out', tmp_path/'p', '--force', '--bg-threshold', 0.05)
        return net
    with mock.patch.object(cli, 'train_segmentation', train_then_replace):
        refused([f"--pseudo {tmp_path/'p'/'pseudo_masks.pt'} changed while `multiminer train-seg` ran"],
                'train-seg', '--pseudo', tmp_path/'p', '--out', tmp_path/'s', '--epochs', 1)
    assert read_run(tmp_path/'s')['finished'] is False
    refused(['--force'], 'train-seg', '--pseudo', tmp_path/'p', '--out', tmp_path/'s', '--epochs', 1, '--resume')
    ok('train-seg', '--pseudo', tmp_path/'p', '--out', tmp_path/'s', '--epochs', 1, '--force')


def test_no_run_inside_a_stage_folder(tmp_path, clf):
    "A stage's folder holds only what that stage writes: no run inside it, and --force never deletes one found there."
    ok('pseudo-labels', '--mining', clf/'m', '--out', tmp_path/'p')
    refused([f"inside {tmp_path/'p'}", '`multiminer pseudo-labels` run'], 'mine', '--classifier', clf/'c',
            '--out', tmp_path/'p'/'sub'/'m')
    (tmp_path/'m2').mkdir(); shutil.copytree(clf/'m', tmp_path/'m2'/'m')
    (tmp_path/'m2'/'m'/'features'/'ev').mkdir(parents=True)        # a run someone put into an owned subfolder
    (tmp_path/'m2'/'m'/'features'/'ev'/'run.json').write_text('{"stage": "evaluate"}')
    refused(['--force would delete'], 'mine', '--classifier', clf/'c', '--out', tmp_path/'m2'/'m', '--force')
    assert (tmp_path/'m2'/'m'/'features'/'ev'/'run.json').is_file() and (tmp_path/'m2'/'m'/'mining_result.pt').is_file()


@pytest.mark.parametrize('command', ['demo', 'mine'])
def test_a_failed_resume_on_a_full_disk_keeps_a_finished_run_finished(tmp_path, clf, command):
    """--resume of a finished run fails on a full disk before its result changes: the run stays finished, although no
    run.json can be written any more (the finished one was kept under a second name, and a rename needs no space)."""
    import multiminer.runtime as rt
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path/'o'/'x'))
    def fake_demo(out, **kw):
        (Path(out)/'metrics.json').write_text('{"pseudo_miou": {}}'); return dict(pseudo_miou={})
    real_json, calls = rt.write_json, []
    def write_json(path, obj):                   # the first write (finished: false) fits; the disk is full after it
        calls.append(path)
        if len(calls) > 1: raise full
        real_json(path, obj)
    if command == 'demo':
        args = ('demo', '--out', tmp_path/'o', '--n-images', 16, '--image-size', 32, '--no-crf', '--no-segmentation')
        with mock.patch.object(cli, 'run_demo', fake_demo): ok(*args)
        fail = mock.patch.object(cli, 'run_demo', side_effect=full)
    else:
        shutil.copytree(clf/'m', tmp_path/'o')
        args = ('mine', '--classifier', clf/'c', '--out', tmp_path/'o', '--max-steps', 5)
        fail = mock.patch.object(cli, 'mining_bar', side_effect=full)
    before = (tmp_path/'o'/'run.json').read_bytes()
    with fail, mock.patch.object(rt, 'write_json', write_json):
        refused(['No space left'], *args, '--resume')
    assert (tmp_path/'o'/'run.json').read_bytes() == before and not (tmp_path/'o'/rt.KEPT_RUN).exists()


def test_the_voc_fingerprint_sees_an_edit_anywhere_in_a_file(tmp_path):
    "Real VOC pictures are often over 128 KiB: a same-size edit in the middle of one changes the data's fingerprint."
    from multiminer.data import voc_dataset
    from multiminer.runtime import data_fingerprint
    make_voc_fixture(tmp_path)
    ds = voc_dataset(tmp_path, 'val')
    img = Path(ds.image_paths[0]); img.write_bytes(img.read_bytes() + bytes(300_000))     # a JPEG with trailing bytes
    fp = data_fingerprint(dict(kind='voc'), ds)
    b = bytearray(img.read_bytes()); b[150_000] ^= 0xFF; img.write_bytes(bytes(b))
    assert data_fingerprint(dict(kind='voc'), ds) != fp


def test_evaluate_refuses_other_synthetic_data_than_the_networks(tmp_path, clf):
    "Synthetic images are known by their spec: a network is evaluated on its own data set's images, not on another's."
    ok('pseudo-labels', '--mining', clf/'m', '--out', tmp_path/'p')
    ok('train-seg', '--pseudo', tmp_path/'p', '--out', tmp_path/'s', '--epochs', 1)
    for other in (['--data', 'synthetic'], ['--image-size', 64], ['--seed', 9]):
        refused(['not the images --seg'], 'evaluate', '--seg', tmp_path/'s', '--out', tmp_path/'e', '--split', 'train', *other)
    ok('evaluate', '--seg', tmp_path/'s', '--out', tmp_path/'e', '--split', 'train')


def test_a_disk_full_at_the_first_record_names_the_file_and_leaves_no_folder(tmp_path):
    "ENOSPC from a write (no file name in it) is reported with the file it was writing; the new folder is taken back."
    import multiminer.runtime as rt
    real = Path.write_text
    def full(self, *a, **kw):
        if self.name.startswith(rt.RUN_FILE): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **kw)
    with mock.patch.object(Path, 'write_text', full):
        refused([f"cannot write {tmp_path/'o'/'run.json'}: No space left"], 'train-classifier', *SYN, '--out', tmp_path/'o')
    assert not (tmp_path/'o').exists()


@pytest.mark.parametrize('command', ['demo', 'table2', 'fig6'])
def test_the_experiments_refuse_more_images_than_memory_holds(tmp_path, command):
    "As the stages do: the images and masks of --n-images must fit in memory, checked before anything is allocated."
    refused(['--n-images 100000000', 'more than the'], command, '--out', tmp_path/'o', '--n-images', 100_000_000,
            '--image-size', 32)
    assert not (tmp_path/'o').exists()


def test_mine_names_a_truncated_saliency_map(tmp_path, clf):
    _saliency(tmp_path/'s', 16, 32)
    p = tmp_path/'s'/'000002.png'; p.write_bytes(p.read_bytes()[:60])
    refused([f'the saliency map {p} cannot be read'], 'mine', '--classifier', clf/'c', '--out', tmp_path/'m', '--saliency', tmp_path/'s')


@pytest.mark.parametrize('option, value', [('--workers', 65), ('--modulator-width', 100_000)])
def test_process_and_width_options_have_a_ceiling(tmp_path, option, value):
    "300 workers for 16 images took 12 times as long, 100000 hung; a modulator a million channels wide needs terabytes."
    code, _, err = run_cli('train-classifier', *SYN, option, value, '--out', tmp_path/'o')
    assert code == 2 and f'{option}: must be an integer in' in err and not (tmp_path/'o').exists()


@pytest.mark.parametrize('env, needle', [(dict(MASTER_PORT='abc'), "MASTER_PORT='abc'"), (dict(RANK='abc'), "RANK='abc'"),
                                         (dict(RANK='7'), 'RANK=7 is not below WORLD_SIZE=2')])
def test_a_torchrun_environment_that_cannot_be_is_named(tmp_path, env, needle):
    "A rank at or above the world size waited at the rendezvous forever; a port or rank that is no number named nothing."
    full = {**dict(WORLD_SIZE='2', RANK='0', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT='29534'), **env}
    with mock.patch.dict(os.environ, full):
        refused([needle], 'train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/'o')


def test_resuming_a_classifier_with_other_workers_names_them(tmp_path):
    "The workers' random streams shape a classifier's batches: --resume with another --workers is refused, naming it."
    ok('train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/'c', '--workers', 0)
    refused(['config.num_workers: 0 then, 1 now'], 'train-classifier', *SYN, '--epochs', 2, '--out', tmp_path/'c',
            '--workers', 1, '--resume')


def test_evaluate_killed_between_its_result_and_its_record(tmp_path, clf):
    "A kill after the result file is written, before run.json: the folder says which run it holds, and --force redoes it."
    import subprocess, sys
    ok('pseudo-labels', '--mining', clf/'m', '--out', tmp_path/'p')
    ok('train-seg', '--pseudo', tmp_path/'p', '--out', tmp_path/'s', '--epochs', 1)
    code = ("import os, multiminer.pipeline as p\nreal = p.write_json\n"
            "def write_json(path, obj):\n    real(path, obj)\n    if path.name.startswith('eval_'): os._exit(9)\n"
            f"p.write_json = write_json\nfrom multiminer.cli import main\nmain(['evaluate', '--seg', {str(tmp_path/'s')!r}, '--out', {str(tmp_path/'e')!r}, '--quiet'])")
    r = subprocess.run([sys.executable, '-c', code], env={**os.environ, 'PYTHONPATH': str(Path(cli.__file__).parent.parent)})
    assert r.returncode == 9 and (tmp_path/'e'/'eval_val.json').is_file() and read_run(tmp_path/'e')['finished'] is False
    ok('evaluate', '--seg', tmp_path/'s', '--out', tmp_path/'e', '--force')
    assert read_run(tmp_path/'e')['finished'] is True


def test_a_failure_after_an_input_was_replaced_names_the_input(tmp_path, clf):
    "A mask that vanished mid-run reads as a damaged file; the message adds that the --pseudo folder changed meanwhile."
    ok('pseudo-labels', '--mining', clf/'m', '--out', tmp_path/'p')
    def replaced_then_fails(*a, **kw):      # another process's pseudo-labels --force, then a mask read fails
        with mock.patch.object(cli, 'NEW_OUTS', []):
            ok('pseudo-labels', '--mining', clf/'m', '--out', tmp_path/'p', '--force', '--bg-threshold', 0.05)
        raise ValueError(f"cannot read the mask {tmp_path/'p'/'masks'/'x.png'}: the file is damaged or truncated")
    with mock.patch.object(cli, 'train_segmentation', replaced_then_fails):
        refused(['damaged', f"--pseudo {tmp_path/'p'/'pseudo_masks.pt'} changed while the command ran"],
                'train-seg', '--pseudo', tmp_path/'p', '--out', tmp_path/'s', '--epochs', 1)
    assert not (tmp_path/'s').exists()          # the new folder was taken back, after the note was made


def test_demo_force_never_deletes_a_run_inside_its_folder(tmp_path):
    "A stage run someone put into a folder the demo owns (mining_*): demo --force refuses, naming it, and deletes nothing."
    def fake_demo(out, **kw):
        (Path(out)/'metrics.json').write_text('{"pseudo_miou": {}}'); return dict(pseudo_miou={})
    args = ('demo', '--out', tmp_path/'d', '--n-images', 16, '--image-size', 32, '--no-crf', '--no-segmentation')
    with mock.patch.object(cli, 'run_demo', fake_demo):
        ok(*args)
        ok('train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/'d'/'mining_mine')
        refused(['--force would delete', 'mining_mine'], *args, '--force')
    assert (tmp_path/'d'/'mining_mine'/'classifier.pt').is_file() and (tmp_path/'d'/'metrics.json').is_file()


def test_a_refused_resume_of_a_finished_run_leaves_no_second_name(tmp_path):
    "The finished run.json kept while --resume runs is put back as it was: one name, the folder as found."
    ok('train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/'c')
    before = sorted(p.name for p in (tmp_path/'c').iterdir())
    refused(['config.batch_size'], 'train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/'c', '--resume', '--batch-size', 4)
    assert sorted(p.name for p in (tmp_path/'c').iterdir()) == before


def test_no_standard_output_at_all(tmp_path):
    "`>&-`: nothing to print to; the run goes on and finishes (print writes nothing, as Python's does)."
    import subprocess, sys
    r = subprocess.run([sys.executable, '-m', 'multiminer', 'train-classifier', *map(str, SYN), '--epochs', '1', '--out', str(tmp_path/'c')],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, close_fds=True,
                       preexec_fn=lambda: os.close(1), env={**os.environ, 'PYTHONPATH': str(Path(cli.__file__).parent.parent)})
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr
    assert read_run(tmp_path/'c')['finished'] is True


def test_erase_force_clears_its_feature_cache(tmp_path):
    "erase writes features/ on VOC data: --force clears it as it does mine's (a stale file stayed in the new run's folder)."
    make_voc_fixture(tmp_path/'voc')
    ok('train-classifier', *VOC, '--voc-root', tmp_path/'voc', '--epochs', 1, '--out', tmp_path/'c')
    ok('erase', '--classifier', tmp_path/'c', '--out', tmp_path/'e')
    (tmp_path/'e'/'features'/'features_99.npy').write_bytes(b'stale')
    ok('erase', '--classifier', tmp_path/'c', '--out', tmp_path/'e', '--force')
    assert not (tmp_path/'e'/'features'/'features_99.npy').exists() and read_run(tmp_path/'e')['finished'] is True

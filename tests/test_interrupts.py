"One folder, one run; split files read as text files are; interrupts and faults end with one line (issue 24), on tiny data."
import codecs, errno, json, os, signal, socket, subprocess, sys, time
from pathlib import Path
from unittest import mock

import pytest
import torch

from multiminer import cli
from multiminer.data import make_voc_fixture, voc_dataset
from multiminer.runtime import lock_path, read_run
from cli_helpers import run_cli, ok, _one_thread  # noqa: F401  (the fixture)

SHAPES = ('--data', 'shapes', '--n-images', 16, '--image-size', 32)


def _holder(out):
    "A process that holds the lock of `out` until it is killed; returns it once the lock is there."
    code = f"from multiminer.runtime import out_lock\nimport time\nwith out_lock({str(out)!r}, 'mine'): time.sleep(60)"
    p = subprocess.Popen([sys.executable, '-c', code], env={**os.environ, 'PYTHONPATH': str(Path(cli.__file__).parent.parent)})
    for _ in range(300):
        if lock_path(out).exists(): return p
        time.sleep(0.05)
    p.kill(); raise AssertionError('the holder never took the lock')


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path/'c'
    p = _holder(out)
    try:
        code, _, err = run_cli('train-classifier', *SHAPES, '--epochs', 1, '--out', out, '--quiet')
        assert code == 2 and f'is being written by process {p.pid}' in err and '`multiminer mine`' in err
        assert not out.exists()                                   # nothing was written
    finally: p.kill(); p.wait()
    ok('train-classifier', *SHAPES, '--epochs', 1, '--out', out)     # the holder is gone: its lock is stale
    assert not lock_path(out).exists() and (out/'classifier.pt').is_file()


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    out = tmp_path/'c'
    lock_path(out).write_text(json.dumps(dict(pid=int(dead.stdout), host=socket.gethostname(), command='demo', started='then')))
    ok('train-classifier', *SHAPES, '--epochs', 1, '--out', out)
    assert sorted(q.name for q in tmp_path.iterdir()) == ['c']


def test_split_files_with_a_byte_order_mark_and_other_encodings(tmp_path):
    make_voc_fixture(tmp_path)
    seg = tmp_path/'VOCdevkit'/'VOC2012'/'ImageSets'/'Segmentation'
    want = {s: list(voc_dataset(tmp_path, s).names) for s in ('train', 'val', 'train_aug')}
    for f in ('train.txt', 'val.txt'): (seg/f).write_bytes(codecs.BOM_UTF8 + (seg/f).read_bytes())
    assert {s: list(voc_dataset(tmp_path, s).names) for s in want} == want      # no val image moves into training
    (seg/'val.txt').write_bytes((seg/'val.txt').read_bytes()[3:].decode().encode('utf-16'))
    code, _, err = run_cli('train-classifier', '--voc-root', tmp_path, '--out', tmp_path/'c', '--epochs', 1, '--quiet')
    assert code == 2 and f"{seg/'val.txt'}, line 1: the file is UTF-16" in err
    (seg/'val.txt').write_bytes(b'v1\nv\xe92\n')
    with pytest.raises(ValueError, match=r'val.txt, line 2: byte 0xe9 is not UTF-8'): voc_dataset(tmp_path, 'val')


def test_ctrl_c_prints_one_line(tmp_path):
    with mock.patch.object(cli, 'train_classifier', side_effect=KeyboardInterrupt):
        code, _, err = run_cli('train-classifier', *SHAPES, '--out', tmp_path/'c', '--quiet')
    assert code == 130 and err.strip().count('\n') == 0 and 'interrupted' in err and 'Traceback' not in err
    assert not (tmp_path/'c').exists() and not lock_path(tmp_path/'c').exists()


def test_ctrl_c_in_a_real_run(tmp_path):
    out = tmp_path/'c'
    p = subprocess.Popen([sys.executable, '-m', 'multiminer.cli', 'train-classifier', *map(str, SHAPES), '--epochs', '200',
                          '--out', str(out)], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, 'PYTHONPATH': str(Path(cli.__file__).parent.parent)},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as a terminal gives it, even under a shell that ignores SIGINT
    for _ in range(600):
        if (out/'classifier.pt').is_file(): break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and 'Traceback' not in err, err
    assert 'interrupted; what was done so far is saved in' in err.splitlines()[-1] and '--resume' in err.splitlines()[-1]
    done = torch.load(out/'classifier.pt', weights_only=True)['epoch']   # the signal may come after any epoch
    ok('train-classifier', *SHAPES, '--out', out, '--resume', '--epochs', done + 1)   # the same command resumes, one epoch on


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGHUP], ids=['sigterm', 'sighup'])
def test_sigterm_in_a_real_run(tmp_path, sig):
    "A kill (SIGTERM), or the terminal closed (SIGHUP), ends as Ctrl-C does: one line, exit 128 + the signal, the lock released, and --resume goes on."
    out = tmp_path/'c'
    p = subprocess.Popen([sys.executable, '-m', 'multiminer.cli', 'train-classifier', *map(str, SHAPES), '--epochs', '200',
                          '--out', str(out)], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, 'PYTHONPATH': str(Path(cli.__file__).parent.parent)},
                         preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))     # as from a terminal, even under nohup
    for _ in range(600):
        if (out/'classifier.pt').is_file(): break
        time.sleep(0.05)
    p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 128 + sig and 'Traceback' not in err, err
    assert 'interrupted; what was done so far is saved in' in err.splitlines()[-1]
    assert not lock_path(out).exists()
    done = torch.load(out/'classifier.pt', weights_only=True)['epoch']
    ok('train-classifier', *SHAPES, '--out', out, '--resume', '--epochs', done + 1)

@pytest.mark.parametrize('delay', [0.2, 0.6, 1.0, 1.6, 2.4])
@pytest.mark.parametrize('sig, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=['ctrl-c', 'sigterm'])
def test_a_signal_while_the_library_loads(tmp_path, sig, code, delay):
    """The `multiminer` command (multiminer.__main__) notes a signal while torch loads and ends once loading is done:
    one line, its exit code, nothing written. (Raised inside torch's import, some libraries caught it and went on
    half-loaded.) Later signals reach the command line's own handler, with the same result."""
    p = subprocess.Popen([sys.executable, '-m', 'multiminer', 'demo', '--out', str(tmp_path/'d')], stderr=subprocess.PIPE,
                         text=True, env={**os.environ, 'PYTHONPATH': str(Path(cli.__file__).parent.parent)},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay); p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == code and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert 'interrupted' in err and not lock_path(tmp_path/'d').exists()


@pytest.mark.parametrize('attempt', range(3))
def test_a_second_ctrl_c_while_winding_up_changes_nothing(tmp_path, attempt):
    "Two Ctrl-C 3 ms apart, in a real run started by the `multiminer` command: one line, exit 130, and --resume goes on."
    out = tmp_path/'c'
    p = subprocess.Popen([sys.executable, '-m', 'multiminer', 'train-classifier', *map(str, SHAPES), '--epochs', '200',
                          '--out', str(out)], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, 'PYTHONPATH': str(Path(cli.__file__).parent.parent)},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(600):
        if (out/'classifier.pt').is_file(): break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT); time.sleep(0.003); p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and 'Traceback' not in err and 'Exception ignored' not in err, err
    assert 'interrupted; what was done so far is saved in' in err.splitlines()[-1] and not lock_path(out).exists()
    done = torch.load(out/'classifier.pt', weights_only=True)['epoch']
    ok('train-classifier', *SHAPES, '--out', out, '--resume', '--epochs', done + 1)


def test_worker_processes_leave_ctrl_c_to_the_main_one():
    "A terminal sends Ctrl-C to every process of the command: workers ignore it (no traceback of theirs), the main process stops them."
    from multiminer.runtime import ordered_map
    assert list(ordered_map(signal.getsignal, [(signal.SIGINT,)] * 3, workers=2)) == [signal.SIG_IGN] * 3


def test_out_under_a_file_and_a_name_too_long(tmp_path):
    (tmp_path/'f').write_text('x')
    code, _, err = run_cli('train-classifier', *SHAPES, '--out', tmp_path/'f'/'sub', '--quiet')
    assert code == 2 and f"cannot write {tmp_path/'f'}: it is a file, not a folder" in err
    code, _, err = run_cli('train-classifier', *SHAPES, '--out', tmp_path/('a' * 300), '--quiet')
    assert code == 2 and 'File name too long' in err and 'Traceback' not in err


def test_read_only_out(tmp_path):
    def read_only(out, *a, **k): raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(out)/'run.json'))
    with mock.patch.object(cli, 'write_run', read_only):
        code, _, err = run_cli('train-classifier', *SHAPES, '--out', tmp_path/'c', '--quiet')
    assert code == 2 and f"cannot write {tmp_path/'c'/'run.json'}: Read-only file system" in err


def test_a_full_disk_leaves_no_temporary_file(tmp_path):
    def full(obj, f):
        Path(f).write_bytes(b'PK\x03\x04')
        raise RuntimeError('[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: '
                           'file write failed')
    with mock.patch('torch.save', full):
        code, _, err = run_cli('train-classifier', *SHAPES, '--epochs', 1, '--out', tmp_path/'c', '--quiet')
    assert code == 2 and 'classifier.pt' in err and 'is the disk full?' in err and 'Traceback' not in err
    assert not list((tmp_path/'c').glob('*.tmp'))


def test_an_interrupted_force_resumes_only_with_its_own_settings(tmp_path):
    "The demo's folder: --resume with another seed is refused; an interrupted --force leaves nothing of the old run."
    out = tmp_path/'d'
    def demo(out, seed, resume, **kw):
        (Path(out)/'classifier').mkdir(exist_ok=True)
        if seed == 1 and not resume: raise KeyboardInterrupt             # killed during the classifier
        (Path(out)/'metrics.json').write_text(json.dumps(dict(pseudo_miou={}, seed=seed)))
        return dict(pseudo_miou={})
    args = ('--n-images', 16, '--image-size', 32, '--no-crf', '--no-segmentation', '--quiet')
    with mock.patch.object(cli, 'run_demo', demo):
        assert run_cli('demo', '--out', out, *args)[0] == 0
        code, _, err = run_cli('demo', '--out', out, '--seed', 1, '--resume', *args)
        assert code == 2 and 'config.seed: 0 then, 1 now' in err
        assert run_cli('demo', '--out', out, '--seed', 1, '--force', *args)[0] == 130
        assert not (out/'metrics.json').exists() and json.loads((out/'run.json').read_text())['finished'] is False
        code, _, err = run_cli('demo', '--out', out, '--resume', *args)          # the old seed: refused
        assert code == 2 and 'config.seed: 1 then, 0 now' in err
        assert run_cli('demo', '--out', out, '--seed', 1, '--resume', *args)[0] == 0
    assert json.loads((out/'metrics.json').read_text())['seed'] == 1 and json.loads((out/'run.json').read_text())['finished']


_AT_FORK = """import signal, sys, traceback, os
armed = [True]
def _at_fork():      # a Ctrl-C just as the parent has forked a worker, where Python's fork handlers run
    if armed and {where!r} in ''.join(traceback.format_stack()): armed.clear(); signal.raise_signal(signal.SIGINT)
os.register_at_fork(after_in_parent=_at_fork)
from multiminer.__main__ import launch
sys.exit(launch(sys.argv[1:]))"""

@pytest.fixture(scope='module')
def pseudo(tmp_path_factory):
    t = tmp_path_factory.mktemp('fork_pseudo')
    ok('train-classifier', *SHAPES, '--epochs', 2, '--out', t/'c')
    ok('mine', '--classifier', t/'c', '--out', t/'m', '--max-steps', 2)
    ok('pseudo-labels', '--mining', t/'m', '--out', t/'p')
    return t/'p'

@pytest.mark.parametrize('stage', ['train-classifier', 'train-seg'])
def test_a_ctrl_c_while_workers_are_forked_is_not_lost(tmp_path, stage, pseudo):
    """A Ctrl-C that lands while a DataLoader forks its workers reached one of Python's fork handlers, which printed
    it and dropped it: the run went on. Deferred until the workers are started, it stops the run."""
    args = {'train-classifier': (*SHAPES, '--epochs', 3), 'train-seg': ('--pseudo', pseudo, '--epochs', 2)}[stage]
    p = subprocess.run([sys.executable, '-c', _AT_FORK.format(where='torch/utils/data'), stage, *map(str, args),
                        '--workers', '1', '--out', str(tmp_path/'o')],
                       capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(Path(cli.__file__).parent.parent)},
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), timeout=300)
    assert p.returncode == 130 and 'Exception ignored' not in p.stderr and 'Traceback' not in p.stderr, p.stderr
    assert 'interrupted' in p.stderr.splitlines()[-1] and not lock_path(tmp_path/'o').exists()


def test_processes_forked_while_signals_are_deferred_can_be_stopped():
    "Workers forked while signals are deferred have the usual handlers: a pool's terminate (SIGTERM) ends them."
    import multiprocessing as mp
    from multiminer.runtime import signals_deferred
    with signals_deferred(): pool = mp.get_context('fork').Pool(1)
    try: assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally: pool.terminate()                  # it waited forever for a worker that only noted the SIGTERM


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, '-m', 'multiminer', *map(str, args)], text=True,
                            env={**os.environ, 'PYTHONPATH': str(Path(cli.__file__).parent.parent)}, **kw)


def test_a_kill_of_the_whole_job_with_dataloader_workers(tmp_path):
    "A scheduler's SIGTERM to every process of the job: the workers leave it to the main process, which ends with one line."
    out = tmp_path/'c'
    p = _cli(['train-classifier', *SHAPES, '--epochs', 200, '--workers', 2, '--out', out], stderr=subprocess.PIPE,
             start_new_session=True)
    for _ in range(600):
        if (out/'classifier.pt').is_file(): break
        time.sleep(0.05)
    time.sleep(0.5); os.killpg(p.pid, signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 143 and 'Traceback' not in err and 'Exception ignored' not in err, err
    assert 'interrupted; what was done so far is saved in' in err.splitlines()[-1]


@pytest.mark.parametrize('where', ['closed pipe', '/dev/full'])
def test_losing_the_standard_output_loses_nothing_else(tmp_path, where):
    "A pipe into `head` that has read its line, or a redirection to a full disk: one note on stderr, and the run finishes."
    args = ['train-classifier', *SHAPES, '--epochs', 3, '--out', tmp_path/'c']
    if where == 'closed pipe':
        p = _cli(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.readline(); p.stdout.close()          # what `| head -1` does
        err = p.communicate(timeout=120)[1]
    else:
        with open('/dev/full', 'w') as full: p = _cli(args, stdout=full, stderr=subprocess.PIPE); err = p.communicate(timeout=120)[1]
    assert p.returncode == 0 and 'Traceback' not in err and 'Exception ignored' not in err, err
    assert 'cannot write the standard output' in err and read_run(tmp_path/'c')['finished'] is True

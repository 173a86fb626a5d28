"""A full disk while the features cache is written (`features/features_<s>.npy` of `mine` on VOC data).

The cache is a memory-mapped `.npy` file. Created sparse, a write into a page the file system has no room for
ended the process with SIGBUS (exit 135, no message), leaving the `.partial` file and the lock behind. Its space is
now reserved before anything is written into the map, so a full disk is one message naming the file, exit 2, and
no `.partial` file; once there is room, `--resume` goes on. The runs that meet the full disk are child processes,
so that a SIGBUS fails the test instead of ending pytest."""
import errno, gc, os, subprocess, sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from multiminer import features
from multiminer.data import make_voc_fixture
from multiminer.features import FeatureBank, extract_features
from multiminer.runtime import lock_path, read_run
from cli_helpers import run_cli, ok, _one_thread

VOC = ['--data', 'voc', '--preset', 'synthetic', '--image-size', 32, '--workers', 0]
MINE = ['--max-steps', 1]
NOSPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- the reservation itself, with the full disk simulated ------------------------------------------------

class _Toy(nn.Module):
    out_channels, stride = 4, 8
    def __init__(self): super().__init__(); self.conv = nn.Conv2d(3, 4, 3, stride=8, padding=1)
    def forward(self, x): return self.conv(x)

def test_the_whole_file_is_allocated_before_it_is_written(tmp_path):
    "On this disk (ext4 or overlay under /tmp) the file's blocks are allocated when the map is created, not as pages are written."
    if not hasattr(os, 'posix_fallocate'): pytest.skip('no posix_fallocate on this platform')
    mm = features._reserved_memmap(tmp_path/'f.npy.partial', np.float32, (64, 4, 32, 32), tmp_path/'f.npy')
    st = os.stat(tmp_path/'f.npy.partial')
    assert st.st_size == mm.offset + mm.nbytes and st.st_blocks * 512 >= st.st_size
    del mm

@pytest.mark.parametrize('cache', [False, True], ids=['extract_features', 'FeatureBank'])
def test_no_room_is_an_oserror_naming_the_file(tmp_path, cache):
    toy, imgs = _Toy(), torch.rand(6, 3, 32, 32)
    with mock.patch.object(os, 'posix_fallocate', side_effect=NOSPACE, create=True):
        with pytest.raises(OSError) as e:
            if cache: FeatureBank(toy, imgs, (32,), cache_dir=tmp_path)[32]
            else: extract_features(toy, imgs, 32, batch_size=2, out_path=tmp_path/'features_32.npy')
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path/'features_32.npy')
    assert list(tmp_path.iterdir()) == []                  # no '.partial' file, no features file
    f = extract_features(toy, imgs, 32, batch_size=2, out_path=tmp_path/'features_32.npy')   # room again: as before
    assert torch.equal(f, extract_features(toy, imgs, 32, batch_size=2))
    assert [p.name for p in tmp_path.iterdir()] == ['features_32.npy']

def test_the_rows_of_several_ranks_reserve_too(tmp_path):
    "The file `_write_rows` creates for the ranks of a `torchrun` run (here one process) is reserved the same way."
    with mock.patch.object(os, 'posix_fallocate', side_effect=NOSPACE, create=True), pytest.raises(OSError) as e:
        features._write_rows(torch.rand(6, 4, 4, 4), 6, tmp_path/'features_32.npy')
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path/'features_32.npy')
    assert list(tmp_path.iterdir()) == []

@pytest.mark.parametrize('code', [errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_file_system_that_cannot_reserve_works_as_before(tmp_path, code):
    toy, imgs = _Toy(), torch.rand(6, 3, 32, 32)
    with mock.patch.object(os, 'posix_fallocate', side_effect=OSError(code, os.strerror(code)), create=True):
        f = extract_features(toy, imgs, 32, batch_size=2, out_path=tmp_path/'f.npy')
    assert torch.equal(f, extract_features(toy, imgs, 32, batch_size=2)) and [p.name for p in tmp_path.iterdir()] == ['f.npy']


# --- `mine` with --out on a small tmpfs ------------------------------------------------------------------

@pytest.fixture(scope='module')
def voc_run(tmp_path_factory):
    "A classifier trained on tiny VOC data, and the sizes of the features files `mine` writes for it."
    t = tmp_path_factory.mktemp('full_disk')
    make_voc_fixture(t/'D', voc_train=tuple(f'a{i}' for i in range(8)), voc_val=('v1', 'v2'))
    ok('train-classifier', *VOC, '--voc-root', t/'D', '--epochs', 1, '--out', t/'c')
    ok('mine', '--classifier', t/'c', '--out', t/'ref', *MINE)        # where there is room: the sizes to aim at
    sizes = {int(p.stem.split('_')[1]): p.stat().st_size for p in (t/'ref'/'features').glob('features_*.npy')}
    assert len(sizes) >= 2, sizes
    return t, dict(sorted(sizes.items()))

def _mount(where, kib):
    where.mkdir(exist_ok=True)
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={kib}k', 'tmpfs', str(where)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f'cannot mount a tmpfs: {r.stderr.strip()}')

def _unmount(where):
    gc.collect()                                            # memory maps of the features this process read
    if subprocess.run(['umount', str(where)], capture_output=True).returncode:
        subprocess.run(['umount', '-l', str(where)], capture_output=True)

@pytest.mark.parametrize('full_at', [0, 1], ids=['first-scale', 'second-scale'])
def test_mine_on_a_full_disk(voc_run, tmp_path, full_at):
    "The disk fills while the features of the first scale (or, the first one written, the second's) are written."
    if os.geteuid() != 0: pytest.skip('mounting a tmpfs needs root')
    t, sizes = voc_run
    (s0, b0), (s1, b1) = list(sizes.items())[:2]
    kib = 32 + (b0 // 2 if full_at == 0 else b0 + b1 // 2) // 1024     # 32 KiB for run.json, the markers, folders
    scale, disk, out = (s0, s1)[full_at], tmp_path/'disk', tmp_path/'disk'/'m'
    _mount(disk, kib)
    try:
        argv = ['mine', '--classifier', t/'c', '--out', out, *MINE, '--quiet']
        r = subprocess.run([sys.executable, '-m', 'multiminer', *map(str, argv)], capture_output=True, text=True,
                           cwd=t, timeout=120)
        assert r.returncode == 2, (r.returncode, r.stderr)      # before the fix: -7 (SIGBUS), nothing on stderr
        lines = [l for l in r.stderr.splitlines() if l.startswith('multiminer mine: error: ')]
        assert 'Traceback' not in r.stderr and len(lines) == 1, r.stderr
        assert str(out/'features'/f'features_{scale}.npy') in lines[0] and 'No space left' in lines[0], lines[0]
        assert not list(disk.rglob('*.partial')) and not lock_path(out).exists(), sorted(map(str, disk.rglob('*')))
        assert not (out/'features'/f'features_{scale}.npy').exists()
        if full_at: assert (out/'features'/f'features_{s0}.npy').stat().st_size == b0   # the scale before it is kept
        r = subprocess.run(['mount', '-o', 'remount,size=16m', str(disk)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        ok('mine', '--classifier', t/'c', '--out', out, *MINE, '--resume')            # room again: it goes on
        assert read_run(out)['finished'] and not list(disk.rglob('*.partial'))
        assert {p.name: p.stat().st_size for p in (out/'features').glob('*.npy')} == {f'features_{s}.npy': b for s, b in sizes.items()}
    finally: _unmount(disk)

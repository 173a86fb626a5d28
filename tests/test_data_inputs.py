"""Hostile inputs to the VOC/SBD readers: a `.mat` mask that decodes to gigabytes, complex or MATLAB v7.3 masks,
split files that are endless, huge or FIFOs, images of 16 bits or floats, 1-bit masks, and listed paths that are
folders or FIFOs. Each ends with a `ValueError` naming the file (one line and exit 2 from the CLI), never a
traceback, a hang, a wrong result or unbounded memory."""
import contextlib, os, shutil, struct, threading, time, zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from multiminer.data import make_voc_fixture, read_image_file, read_mask_file, read_split_list, voc_dataset
from cli_helpers import refused, _one_thread

VOC = ['--data', 'voc', '--preset', 'synthetic', '--image-size', 32, '--workers', 0]


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
    t = tmp_path_factory.mktemp('inputs_voc'); make_voc_fixture(t/'D'); return t

def _tree(voc, tmp_path):
    d = shutil.copytree(voc/'D', tmp_path/'D'); return d, d/'VOCdevkit'/'VOC2012', d/'benchmark_RELEASE'/'dataset'


@contextlib.contextmanager
def _fifo_watch(fifo, after=3.0):
    "While the block runs, a reader that waits on `fifo` is let go (end of file) after `after` s, and reported: `waited[0]`."
    waited, stop = [False], threading.Event()
    def watch():
        t0 = time.monotonic()
        while not stop.wait(0.05):
            if time.monotonic() - t0 < after: continue
            try: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)); waited[0] = True   # opens only if a reader waits
            except OSError: pass
    th = threading.Thread(target=watch, daemon=True); th.start()
    try: yield waited
    finally: stop.set(); th.join()


# --- SBD's MATLAB masks ---------------------------------------------------------------------------------

def _mat_bomb(path, h, w, chunk=1_000_000):
    "A MATLAB v5 file of SBD's struct GTcls.Segmentation, an h x w uint8 array of zeros, compressed: written without ever holding it."
    tag = lambda t, n: struct.pack('<II', t, n)
    zeros = -(-h * w // 8) * 8                                              # the data, padded to 8 bytes
    seg_head = tag(6, 8) + struct.pack('<II', 9, 0) + tag(5, 8) + struct.pack('<ii', h, w) + tag(1, 0) + tag(2, h * w)
    struct_head = (tag(6, 8) + struct.pack('<II', 2, 0) + tag(5, 8) + struct.pack('<ii', 1, 1) + tag(1, 5)
                   + b'GTcls\0\0\0' + struct.pack('<HHi', 5, 4, 32) + tag(1, 32) + b'Segmentation'.ljust(32, b'\0'))
    seg_size = len(seg_head) + zeros
    var = tag(14, len(struct_head) + 8 + seg_size) + struct_head + tag(14, seg_size) + seg_head
    def flushed(data, header=False):                                        # a full flush resets the dictionary: the
        c = zlib.compressobj(9); out = c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)   # pieces decode one after another
        return out if header else out[2:]
    a, b = 1, 0
    for byte in var: a = (a + byte) % 65521; b = (b + a) % 65521
    b = (b + zeros * a) % 65521                                             # Adler-32 of var + zeros, by formula
    n, rest = divmod(zeros, chunk)
    first, block, last = flushed(var, header=True), flushed(bytes(chunk)), flushed(bytes(rest)) if rest else b''
    end = b'\x03\x00' + struct.pack('>I', (b << 16) | a)                  # an empty final block, the checksum
    with open(path, 'wb') as f:
        f.write(b'MATLAB 5.0 MAT-file, written by a test'.ljust(116) + bytes(8) + b'\x00\x01IM')
        f.write(tag(15, len(first) + n * len(block) + len(last) + len(end)) + first)
        for _ in range(n): f.write(block)
        f.write(last + end)

def test_a_mat_bomb_is_refused_before_it_is_decoded(voc, tmp_path):
    "2.5 MB on disk, 2.5 GB decoded: refused from its headers (run this under `prlimit --as=4000000000`: nothing large is held)."
    d, v, sbd = _tree(voc, tmp_path)
    _mat_bomb(sbd/'cls'/'s1.mat', 50000, 50000)
    assert (sbd/'cls'/'s1.mat').stat().st_size < 3_000_000
    refused([sbd/'cls'/'s1.mat', 'decodes to over 2,500,000', 'MAX_MAT_BYTES'], 'train-classifier', *VOC, '--voc-root', d,
            '--epochs', 1, '--out', tmp_path/'o')

def test_a_mat_mask_over_max_image_pixels_is_refused_by_its_dimensions(tmp_path):
    p = tmp_path/'s1.mat'; _mat_bomb(p, 3000, 3000)                  # 9 MB decoded: under MAX_MAT_BYTES, over MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match=r'is 3000 x 3000 pixels .*MAX_IMAGE_PIXELS') as e: read_mask_file(p)
    assert str(p) in str(e.value)

def test_out_of_memory_is_not_called_damage(voc, tmp_path, monkeypatch):
    import scipy.io
    def no_memory(*a, **k): raise MemoryError()
    monkeypatch.setattr(scipy.io, 'loadmat', no_memory)
    p = voc/'D'/'benchmark_RELEASE'/'dataset'/'cls'/'s1.mat'
    with pytest.raises(ValueError) as e: read_mask_file(p)
    assert str(p) in str(e.value) and 'memory' in str(e.value) and 'damaged' not in str(e.value)

def test_a_complex_mat_mask_is_no_mask(voc, tmp_path):
    d, v, sbd = _tree(voc, tmp_path)
    savemat(sbd/'cls'/'s1.mat', {'GTcls': {'Segmentation': np.ones((40, 56)) * (1 + 1j)}})
    refused([sbd/'cls'/'s1.mat', 'complex numbers, not class indices'], 'train-classifier', *VOC, '--voc-root', d,
            '--epochs', 1, '--out', tmp_path/'o')

def test_a_matlab_v73_mask_is_named_as_such(tmp_path):
    p = tmp_path/'s1.mat'
    p.write_bytes(b'MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .'.ljust(124) + b'\x00\x02IM' + bytes(384))
    with pytest.raises(ValueError, match=r'is a MATLAB v7\.3 \(HDF5\) file') as e: read_mask_file(p)
    assert str(p) in str(e.value) and 'damaged' not in str(e.value)


# --- split files ----------------------------------------------------------------------------------------

def test_a_split_file_linked_to_dev_zero_is_refused(voc, tmp_path):
    d, v, sbd = _tree(voc, tmp_path)
    (sbd/'val.txt').unlink(); (sbd/'val.txt').symlink_to('/dev/zero')
    refused([sbd/'val.txt', 'is a device, not a file'], 'train-classifier', *VOC, '--voc-root', d, '--epochs', 1,
            '--out', tmp_path/'o')

@pytest.mark.parametrize('which', ['ImageSets/Segmentation/train.txt', 'ImageSets/Segmentation/val.txt', 'sbd/train.txt'])
def test_a_split_file_that_is_a_fifo_is_refused_unopened(voc, tmp_path, which):
    d, v, sbd = _tree(voc, tmp_path)
    p = sbd/'train.txt' if which.startswith('sbd/') else v/which
    p.unlink(); os.mkfifo(p)
    with _fifo_watch(p) as waited, pytest.raises(ValueError, match='is a FIFO') as e: voc_dataset(d, 'train_aug')
    assert str(p) in str(e.value) and not waited[0]

def test_a_split_file_over_the_limit_is_refused(tmp_path):
    from multiminer.data import MAX_SPLIT_BYTES
    assert MAX_SPLIT_BYTES >= 10 * 130_000                    # far above train_aug's list
    p = tmp_path/'train.txt'
    with open(p, 'wb') as f: f.write(b'a1\n'); f.truncate(MAX_SPLIT_BYTES + 1)        # sparse: nothing more is written
    with pytest.raises(ValueError, match='is over .* bytes') as e: read_split_list(p)
    assert str(p) in str(e.value)
    p.write_text(''.join(f"2008_{i:06d}\n" for i in range(11_000)))           # train_aug's size still reads
    assert len(read_split_list(p)) == 11_000


# --- images and masks that are not 8-bit class pictures ------------------------------------------------

def test_a_16_bit_image_is_refused_not_clipped(voc, tmp_path):
    d, v, sbd = _tree(voc, tmp_path)
    Image.fromarray(np.full((40, 56), 1000, np.uint16)).save(v/'JPEGImages'/'a1.jpg', format='PNG')   # mode I;16
    refused([v/'JPEGImages'/'a1.jpg', "mode 'I;16'", 'not 8 bits a channel'], 'train-classifier', *VOC, '--voc-root', d,
            '--epochs', 1, '--out', tmp_path/'o')

@pytest.mark.parametrize('array,fmt,mode', [(np.full((4, 5), 0.5, np.float32), 'TIFF', 'F'),
                                            (np.full((4, 5), 70000, np.int32), 'TIFF', 'I')])
def test_images_of_floats_or_wide_integers_are_refused(tmp_path, array, fmt, mode):
    p = tmp_path/'a1.jpg'; Image.fromarray(array).save(p, format=fmt)
    assert Image.open(p).mode.startswith(mode)
    with pytest.raises(ValueError, match=f"has mode '{mode}") as e: read_image_file(p)
    assert str(p) in str(e.value)

def test_8_bit_images_still_read(tmp_path):
    for mode in ('L', 'P', 'RGB', 'RGBA', 'CMYK'):
        p = tmp_path/f"{mode}.png" if mode != 'CMYK' else tmp_path/'c.jpg'
        Image.new(mode, (5, 4)).save(p)
        assert read_image_file(p).shape == (4, 5, 3)

def test_a_1_bit_mask_is_no_mask(voc, tmp_path):
    d, v, sbd = _tree(voc, tmp_path)
    m = np.zeros((40, 56), bool); m[10:20, 10:20] = True
    Image.fromarray(m).save(v/'SegmentationClass'/'a1.png')
    assert Image.open(v/'SegmentationClass'/'a1.png').mode == '1'
    with pytest.raises(ValueError, match=r"is not a mask: it is a 1-bit \(mode '1'\) picture") as e:
        voc_dataset(d, 'train')[0]
    assert str(v/'SegmentationClass'/'a1.png') in str(e.value)


# --- listed paths that are no files ---------------------------------------------------------------------

def test_an_image_that_is_a_folder_is_named_as_one(voc, tmp_path):
    d, v, sbd = _tree(voc, tmp_path)
    (v/'JPEGImages'/'a2.jpg').unlink(); (v/'JPEGImages'/'a2.jpg').mkdir()
    refused([v/'JPEGImages'/'a2.jpg', 'is a folder'], 'train-classifier', *VOC, '--voc-root', d, '--epochs', 1,
            '--out', tmp_path/'o')

def test_a_mask_that_is_a_fifo_is_named_as_one(voc, tmp_path):
    d, v, sbd = _tree(voc, tmp_path)
    (v/'SegmentationClass'/'a2.png').unlink(); os.mkfifo(v/'SegmentationClass'/'a2.png')
    with pytest.raises(ValueError, match='is a FIFO') as e: voc_dataset(d, 'train')
    assert str(v/'SegmentationClass'/'a2.png') in str(e.value) and 'missing' not in str(e.value)

@pytest.mark.parametrize('read', [read_image_file, read_mask_file], ids=['image', 'mask'])
def test_a_fifo_read_directly_is_never_waited_on(tmp_path, read):
    "A file swapped for a FIFO after the listing was checked: the reader says what it is at once."
    p = tmp_path/'x.png'; os.mkfifo(p)
    with _fifo_watch(p) as waited, pytest.raises(ValueError, match='is a FIFO') as e: read(p)
    assert str(p) in str(e.value) and not waited[0]

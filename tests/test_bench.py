"The benchmark's checks: `check_bench` on complete and incomplete files, and the FLOP counter against hand computations."
import json, math
import pytest
import torch
from torch import nn

from multiminer.bench import BENCH_KEYS, MEMORY_STAGES, FWD_MODELS, FWD_SIZES, PRECISIONS, check_bench, conv_flops, _put
from multiminer.models import ParallelModulator


def _complete():
    res = {}
    for k in BENCH_KEYS: _put(res, k, 0.5)
    return res


def _write(tmp_path, res):
    p = tmp_path / 'bench.json'
    p.write_text(json.dumps(res))
    return p


def test_bench_keys_cover_the_issue():
    "Every measurement of the issue is a key, with both CRF worker counts, every stage and every network size and precision."
    keys = set(BENCH_KEYS)
    assert len(keys) == len(BENCH_KEYS)
    for k in ('cached_vs_reextract.synthetic', 'cached_vs_reextract.vgg16_321', 'cost_per_image_ratio', 'memory_ratio_steps',
              'fraction_of_peak', 'memory_per_image.demo', 'crf_images_per_s.1', 'crf_images_per_s.2'):
        assert k in keys
    assert {f'memory_per_image.{s}' for s in MEMORY_STAGES} <= keys
    assert {f'fwd_bwd_images_per_s.{m}.{s}.{p}' for m in FWD_MODELS for s in FWD_SIZES for p in PRECISIONS} <= keys
    assert FWD_SIZES == (256, 321, 417) and set(FWD_MODELS) == {'vgg16', 'deeplab_largefov'}


def test_check_bench_accepts_complete(tmp_path):
    res = _complete()
    assert check_bench(_write(tmp_path, res)) == res


def test_check_bench_accepts_null_with_reason(tmp_path):
    res = _complete()
    _put(res, 'fwd_bwd_images_per_s.vgg16.417.amp', None)
    res['skipped'] = {'fwd_bwd_images_per_s.vgg16.417.amp': 'mixed precision is measured on CUDA only'}
    check_bench(_write(tmp_path, res))


@pytest.mark.parametrize('key', ['cached_vs_reextract.vgg16_321', 'memory_per_image.segmentation', 'crf_images_per_s.1',
                                 'fwd_bwd_images_per_s.deeplab_largefov.256.fp32', 'fraction_of_peak'])
def test_check_bench_names_a_missing_key(tmp_path, key):
    res = _complete()
    *path, last = key.split('.')
    d = res
    for k in path: d = d[k]
    del d[last]
    with pytest.raises(ValueError, match=f"{key.replace('.', '[.]')}: missing"):
        check_bench(_write(tmp_path, res))


def test_check_bench_missing_section(tmp_path):
    res = _complete(); del res['memory_per_image']
    with pytest.raises(ValueError) as e: check_bench(_write(tmp_path, res))
    assert all(f'memory_per_image.{s}: missing' in str(e.value) for s in ('demo',) + MEMORY_STAGES)


@pytest.mark.parametrize('bad', [None, 'fast', True, [1.0], {'x': 1}])
def test_check_bench_refuses_bad_values(tmp_path, bad):
    "null needs a reason in 'skipped'; strings, booleans, lists and dicts are not figures."
    res = _complete()
    res['cost_per_image_ratio'] = bad
    res['skipped'] = {'cost_per_image_ratio': ''}     # an empty reason is no reason
    with pytest.raises(ValueError, match='cost_per_image_ratio'):
        check_bench(_write(tmp_path, res))


def test_check_bench_refuses_non_finite(tmp_path):
    p = tmp_path / 'bench.json'
    res = _complete(); res['memory_ratio_steps'] = math.inf
    p.write_text(json.dumps(res))                     # Python's json writes Infinity
    with pytest.raises(ValueError, match='memory_ratio_steps: inf is not a finite number'):
        check_bench(p)


def _hand(n, c_in, c_out, k, h_out, w_out, groups=1):
    return 2 * n * c_out * h_out * w_out * (c_in // groups) * k * k


@pytest.mark.parametrize('c_in,c_out,k,stride,pad,dil,groups,size', [
    (3, 8, 3, 1, 1, 1, 1, 16),
    (16, 32, 1, 1, 0, 1, 1, 7),
    (8, 12, 3, 2, 1, 1, 4, 15),
    (4, 4, 3, 1, 2, 2, 1, 10),
    (6, 6, 5, 3, 0, 1, 6, 20),
])
def test_conv_flops_forward(c_in, c_out, k, stride, pad, dil, groups, size):
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dil, groups=groups)
    x = torch.randn(2, c_in, size, size)
    # output side by hand: floor((size + 2 pad - dil (k - 1) - 1) / stride) + 1
    side = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
    y, flops = conv_flops(conv, x)
    assert y.shape == (2, c_out, side, side)
    assert flops == _hand(2, c_in, c_out, k, side, side, groups)


def test_conv_flops_backward():
    "Backward: the weight gradient costs the forward again; the input gradient again, only when the input needs it."
    conv = nn.Conv2d(5, 7, 3, padding=1)
    fwd = _hand(3, 5, 7, 3, 12, 12)
    def train(x): conv(x).square().mean().backward()
    assert conv_flops(train, torch.randn(3, 5, 12, 12))[1] == 2 * fwd
    assert conv_flops(train, torch.randn(3, 5, 12, 12, requires_grad=True))[1] == 3 * fwd


def test_conv_flops_ignores_other_ops():
    "A matrix product, pooling and activations are not convolutions: only the convolution is counted."
    conv, lin = nn.Conv2d(2, 3, 3), nn.Linear(48, 10)
    def f(x): return lin(torch.relu(conv(x)).flatten(1)) @ torch.randn(10, 10)
    assert conv_flops(f, torch.randn(4, 2, 6, 6))[1] == _hand(4, 2, 3, 3, 4, 4)


def test_conv_flops_modulator_training_step():
    "The modulator's training pass as mining runs it (features need no gradient): 2x forward for its first layer, 3x for the rest."
    D, C, W, h = 16, 4, 24, 9
    mod = ParallelModulator(D, C, width=W)
    n = 2
    conv1, conv2, conv3 = _hand(n, D, W, 3, h, h), _hand(n, W, W, 3, h, h), _hand(n, W, C, 1, h, h)
    feats = torch.randn(n, D, h, h)
    assert conv_flops(mod, feats)[1] == conv1 + conv2 + conv3
    def train(f): nn.functional.binary_cross_entropy_with_logits(mod(f), torch.ones(n, C)).backward()
    assert conv_flops(train, feats)[1] == 2 * conv1 + 3 * (conv2 + conv3)

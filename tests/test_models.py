"Tests of multiminer.models beyond the notebook: weight loading (strict, local file, hub cache, offline error)."
import urllib.error

import pytest
import torch
import torchvision

from multiminer.models import (VGG16_WEIGHTS_FILE, CategoryAwareGenerator, ParallelModulator, SmallExtractor,
                               VGG16Extractor, count_parameters, vgg16_extractor)


from crafted_checkpoints import RunsCode, crafted


@pytest.fixture(scope='module')
def tv_features():
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).features


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    "An empty torch hub under tmp_path, and a download that fails at once as it does without network."
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    # an earlier torch.hub.set_dir (other tests restore theirs that way) would override TORCH_HOME
    monkeypatch.setattr(torch.hub, '_hub_dir', None)
    def no_network(*args, **kwargs): raise urllib.error.URLError('no network (test)')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    return tmp_path


def test_strict_load_from_torchvision(tv_features):
    net = VGG16Extractor()
    net.load_state_dict(tv_features.state_dict(), strict=True)
    assert list(net.state_dict()) == list(tv_features.state_dict())
    for k, v in tv_features.state_dict().items(): assert torch.equal(net.state_dict()[k], v)


def test_vgg_structure_and_counts():
    net = VGG16Extractor()
    assert len(net) == 30 and isinstance(net[29], torch.nn.ReLU)
    pools = [(m.kernel_size, m.stride, m.padding) for m in net if isinstance(m, torch.nn.MaxPool2d)]
    assert pools == [(3, 2, 1)] * 3 + [(3, 1, 1)]
    assert count_parameters(net) == 14_714_688
    assert (net.out_channels, net.stride) == (512, 8)


def test_vgg_forward_shape():
    with torch.no_grad(): assert VGG16Extractor()(torch.rand(1, 3, 33, 33)).shape == (1, 512, 5, 5)


def test_weights_path_full_and_features_only(tmp_path, tv_features):
    full = {f'features.{k}': v for k, v in tv_features.state_dict().items()} | {'classifier.6.bias': torch.zeros(1000)}
    torch.save(full, tmp_path/'full.pth'); torch.save(tv_features.state_dict(), tmp_path/'feat.pth')
    for f in ('full.pth', 'feat.pth'):
        assert torch.equal(vgg16_extractor(weights_path=tmp_path/f)[28].weight, tv_features[28].weight)


def test_weights_path_strict(tmp_path, tv_features):
    sd = tv_features.state_dict(); sd.pop('28.bias')
    torch.save(sd, tmp_path/'broken.pth')
    with pytest.raises(RuntimeError, match='28.bias'): vgg16_extractor(weights_path=tmp_path/'broken.pth')


def test_pretrained_offline_message(offline_hub):
    with pytest.raises(RuntimeError) as e: vgg16_extractor(pretrained=True)
    msg = str(e.value)
    assert VGG16_WEIGHTS_FILE in msg and 'weights_path' in msg
    assert str(offline_hub/'hub'/'checkpoints'/VGG16_WEIGHTS_FILE) in msg
    assert isinstance(e.value.__cause__, urllib.error.URLError)


def test_pretrained_from_hub_cache(offline_hub, tv_features):
    "Following the error message's advice (file in the hub cache) works without network."
    ckpt = offline_hub/'hub'/'checkpoints'/VGG16_WEIGHTS_FILE
    ckpt.parent.mkdir(parents=True)
    torch.save({f'features.{k}': v for k, v in tv_features.state_dict().items()}, ckpt)
    assert torch.equal(vgg16_extractor(pretrained=True)[0].weight, tv_features[0].weight)


@pytest.mark.parametrize('size,out', [(96, 12), (321, 41), (417, 53), (9, 2)])
def test_small_extractor_stride(size, out):
    with torch.no_grad(): y = SmallExtractor(out_channels=24)(torch.rand(1, 3, size, size))
    assert y.shape == (1, 24, out, out)


@pytest.mark.parametrize('size,out8,out4', [(96, 12, 24), (97, 13, 25), (321, 41, 81), (9, 2, 3)])
@pytest.mark.parametrize('kw', [{}, dict(downsample='pool'), dict(convs_per_stage=2)])
def test_small_extractor_stride_knob(size, out8, out4, kw):
    "stride=4: only the first two stages downsample; stride=8 (the default) is unchanged."
    with torch.no_grad():
        for stride, out in ((8, out8), (4, out4)):
            net = SmallExtractor(out_channels=24, stride=stride, **kw)
            assert net.stride == stride and net(torch.rand(1, 3, size, size)).shape == (1, 24, out, out)
    assert SmallExtractor.stride == SmallExtractor().stride == 8
    assert count_parameters(SmallExtractor(stride=4, **kw)) == count_parameters(SmallExtractor(**kw))


@pytest.mark.parametrize('bad', [1, 2, 16, '4', 4.5, None, True])
def test_small_extractor_bad_stride(bad):
    with pytest.raises(ValueError, match='stride must be 4 or 8'): SmallExtractor(stride=bad)


def test_heads_shapes_and_errors():
    m = ParallelModulator(16, 5, width=8)
    F = torch.randn(3, 16, 7, 9)
    assert m(F).shape == (3, 5) and m.cam(F).shape == (3, 5, 7, 9)
    g = CategoryAwareGenerator.from_modulator(m)
    assert (g(F) >= 0).all() and torch.allclose(g(F), m.cam(F).relu())
    for bad in (torch.randn(3, 15, 7, 9), torch.randn(16, 7, 9), torch.randn(1, 3, 16, 7, 9)):
        with pytest.raises(ValueError, match=r'\(N, 16, H, W\)'): m(bad)
        with pytest.raises(ValueError, match=r'\(N, 16, H, W\)'): g(bad)


def test_paper_modulator_count():
    assert count_parameters(ParallelModulator(512, 20, width=1024)) == 14_178_324


def test_load_checkpoint_refuses_code(tmp_path):
    from multiminer.models import load_checkpoint
    marker = tmp_path/'pwned_x'
    bad = crafted(tmp_path/'bad.pt', marker, model={})
    with pytest.raises(ValueError, match=r"refused to load '.*bad\.pt'.*system"): load_checkpoint(bad)
    with pytest.raises(ValueError, match='refused to load'): vgg16_extractor(weights_path=bad)
    assert not marker.exists()
    torch.save(dict(w=torch.ones(2), cfg=dict(a=(1, 2), b=None, c='x')), tmp_path/'ok.pt')
    assert load_checkpoint(tmp_path/'ok.pt')['cfg'] == dict(a=(1, 2), b=None, c='x')

"""`--weights FILE` that is no VGG-16 ImageNet checkpoint: another network's weights, a cut tensor, an empty dict,
a non-tensor value, a bare tensor, NaN. Each is refused on loading with one line naming the file (exit 2 from the
CLI), never a `load_state_dict` traceback and never a training run on NaN weights."""
import inspect

import pytest
import torch
import torchvision

import multiminer.models as mm
from multiminer.models import VGG16Extractor, imagenet_state_dict, vgg16_extractor

from cli_helpers import _one_thread, refused  # noqa: F401  (the fixture is used by every test of this file)
from crafted_checkpoints import crafted


@pytest.fixture(scope='module')
def vgg_sd():
    "A torchvision-style VGG-16 state dict (`features.*` keys, the right shapes), each tensor one number expanded: kB on disk, not 58 MB."
    return {f'features.{k}': torch.full((), 0.01 * i).expand(v.shape) for i, (k, v) in enumerate(VGG16Extractor().state_dict().items())}


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
    from multiminer.data import make_voc_fixture
    root = tmp_path_factory.mktemp('voc')
    make_voc_fixture(root)
    return root


def _with(sd, key, value): return dict(sd, **{key: value})


def _bad_files(vgg_sd):
    "name -> (what the file holds, what the error line must say besides the file's name)."
    cut = vgg_sd['features.0.weight'][..., :2].clone()
    nan = vgg_sd['features.28.weight'].clone(); nan[0, 0, 0, 0] = float('nan')
    inf = vgg_sd['features.0.bias'].clone(); inf[3] = float('inf')
    return {
        'wrong_network': ({'conv1.weight': torch.zeros(8, 3, 7, 7), 'bn1.weight': torch.ones(8),
                           'fc.weight': torch.zeros(10, 8), 'fc.bias': torch.zeros(10)},
                          ['not a VGG-16 ImageNet checkpoint', 'no features.0.weight', 'conv1.weight']),
        'cut_shape': (_with(vgg_sd, 'features.0.weight', cut),
                      ['not a VGG-16 ImageNet checkpoint', 'features.0.weight is (64, 3, 3, 2) here, (64, 3, 3, 3) in VGG-16']),
        'missing_key': ({k: v for k, v in vgg_sd.items() if k != 'features.28.bias'},
                        ['not a VGG-16 ImageNet checkpoint', 'no features.28.bias']),
        'empty_dict': ({}, ['not a VGG-16 ImageNet checkpoint', 'empty']),
        'non_tensor': ({'features.0.weight': 'hello'}, ['not a state dict', 'features.0.weight holds a str']),
        'bare_tensor': (torch.zeros(3), ['not a state dict (it holds a Tensor)']),
        'a_list': ([torch.zeros(3)], ['not a state dict (it holds a list)']),
        'int_key': ({0: torch.zeros(3)}, ['not a state dict', 'key 0 is an int']),
        'nan_values': (_with(vgg_sd, 'features.28.weight', nan), ['NaN or Inf', 'features.28.weight', '1 non-finite']),
        'inf_values': (_with(vgg_sd, 'features.0.bias', inf), ['NaN or Inf', 'features.0.bias']),
    }


CLI_CASES = ['wrong_network', 'cut_shape', 'missing_key', 'empty_dict', 'non_tensor', 'bare_tensor', 'nan_values']


@pytest.mark.parametrize('case', CLI_CASES)
def test_train_classifier_refuses_bad_weights(case, vgg_sd, voc, tmp_path):
    "The paper's preset (VGG-16): exit 2, one line naming the file and what is wrong with it; nothing trained."
    content, needles = _bad_files(vgg_sd)[case]
    f = tmp_path/f'{case}.pth'; torch.save(content, f)
    out = tmp_path/'out'
    refused([f, *needles], 'train-classifier', '--data', 'voc', '--preset', 'voc', '--voc-root', voc, '--workers', 0,
            '--epochs', 1, '--batch-size', 2, '--modulator-width', 8, '--weights', f, '--out', out)
    assert not any(p.suffix in ('.pt', '.pth') for p in out.rglob('*')), sorted(out.rglob('*'))


def test_train_classifier_refuses_code_in_weights(voc, tmp_path):
    "A pickle that would run code is still refused by --weights, and the code never runs."
    f, marker = tmp_path/'evil.pth', tmp_path/'pwned'
    crafted(f, marker)
    refused([f, 'refused to load'], 'train-classifier', '--data', 'voc', '--preset', 'voc', '--voc-root', voc,
            '--workers', 0, '--epochs', 1, '--batch-size', 2, '--modulator-width', 8, '--weights', f, '--out', tmp_path/'out')
    assert not marker.exists()


@pytest.mark.parametrize('case', ['wrong_network', 'cut_shape', 'missing_key', 'empty_dict', 'non_tensor', 'bare_tensor',
                                  'a_list', 'int_key', 'nan_values', 'inf_values'])
def test_vgg16_extractor_refuses_bad_weights(case, vgg_sd, tmp_path):
    "The library: a WeightsError (a ValueError, and a RuntimeError as load_state_dict's was) on one line naming the file."
    content, needles = _bad_files(vgg_sd)[case]
    f = tmp_path/f'{case}.pth'; torch.save(content, f)
    with pytest.raises(ValueError) as e: vgg16_extractor(weights_path=f)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, RuntimeError)
    assert '\n' not in msg and repr(str(f)) in msg, msg
    for n in needles: assert n in msg, (n, msg)


def test_imagenet_state_dict_checks_what_it_loaded(vgg_sd, tmp_path):
    from torchvision.models import ResNet101_Weights, VGG16_Weights
    torch.save(torch.zeros(3), tmp_path/'t.pth')
    with pytest.raises(ValueError, match=r"'.*t\.pth' is not a state dict \(it holds a Tensor\).*resnet101-"):
        imagenet_state_dict(ResNet101_Weights.IMAGENET1K_V1, tmp_path/'t.pth', 'ResNet-101')
    torch.save({'w': torch.tensor([1., float('nan')]), 'n': torch.tensor(3)}, tmp_path/'nan.pth')
    with pytest.raises(ValueError, match=r"'.*nan\.pth' holds NaN or Inf: w has 1 non-finite values of 2"):
        imagenet_state_dict(VGG16_Weights.IMAGENET1K_V1, tmp_path/'nan.pth', 'VGG-16')
    torch.save(vgg_sd, tmp_path/'ok.pth')
    sd = imagenet_state_dict(VGG16_Weights.IMAGENET1K_V1, tmp_path/'ok.pth', 'VGG-16')
    assert list(sd) == list(vgg_sd) and all(torch.equal(sd[k], v) for k, v in vgg_sd.items())


def test_load_imagenet_fits_or_names_the_first_misfit(vgg_sd):
    "The helper the segmentation networks use: strict loading, its RuntimeError turned into one line."
    feats = {k[len('features.'):]: v for k, v in vgg_sd.items()}
    net = VGG16Extractor()
    mm.load_imagenet(net, feats, 'vgg.pth', 'VGG-16', prefix='features.')
    assert all(torch.equal(net.state_dict()[k], v) for k, v in feats.items())
    cases = [(dict(feats, **{'0.weight': feats['0.weight'][..., :2]}),
              "'vgg.pth' is not a VGG-16 ImageNet checkpoint: features.0.weight is (64, 3, 3, 2) here, (64, 3, 3, 3) in VGG-16"),
             ({k: v for k, v in feats.items() if k != '28.bias'}, "'vgg.pth' is not a VGG-16 ImageNet checkpoint: it has no features.28.bias"),
             (dict(feats, **{'31.weight': torch.zeros(1)}), "it has 1 tensor VGG-16 lacks, such as 31.weight"),
             ({}, "'vgg.pth' is not a VGG-16 ImageNet checkpoint: it holds no tensors"),
             ({'0.weight': 'hello'}, "'vgg.pth' is not a state dict: 0.weight holds a str"),
             (torch.zeros(3), "'vgg.pth' is not a state dict (it holds a Tensor)")]
    for sd, want in cases:
        with pytest.raises(mm.WeightsError) as e: mm.load_imagenet(net, sd, 'vgg.pth', 'VGG-16', prefix='features.')
        assert want in str(e.value) and '\n' not in str(e.value), (want, str(e.value))
    # another network: the ResNet-101 backbone of DeepLab-v2 given VGG-16's tensors
    with pytest.raises(ValueError, match=r"'vgg.pth' is not a ResNet-18 ImageNet checkpoint: it has no conv1.weight "
                                         r"\(none of the \d+ tensors ResNet-18 needs; it holds 26 others, such as 0.weight\)"):
        mm.load_imagenet(torchvision.models.resnet18(), feats, 'vgg.pth', 'ResNet-18')


def test_segmentation_weights_checked(vgg_sd, tmp_path):
    "DeepLab-LargeFOV reads --weights through imagenet_state_dict: a bare tensor and NaN are refused there already."
    from multiminer.segmentation import DeepLabLargeFOV
    torch.save(torch.zeros(3), tmp_path/'t.pth')
    with pytest.raises(ValueError, match=r"not a state dict \(it holds a Tensor\)"): DeepLabLargeFOV(weights_path=tmp_path/'t.pth')
    content, _ = _bad_files(vgg_sd)['nan_values']; torch.save(content, tmp_path/'nan.pth')
    with pytest.raises(ValueError, match='NaN or Inf: features.28.weight'): DeepLabLargeFOV(weights_path=tmp_path/'nan.pth')


def _segmentation_uses_helper():
    import multiminer.segmentation as seg
    return 'load_imagenet(' in inspect.getsource(seg)


@pytest.mark.skipif(not _segmentation_uses_helper(), reason='08_segmentation does not load through load_imagenet yet')
def test_segmentation_misfit_is_one_line(vgg_sd, tmp_path):
    "Once the DeepLab networks load through load_imagenet: another network's weights, one line naming the file."
    from multiminer.segmentation import DeepLabLargeFOV, DeepLabResNet101
    content, _ = _bad_files(vgg_sd)['wrong_network']; torch.save(content, tmp_path/'r.pth')
    with pytest.raises(ValueError, match=r"r\.pth' is not a VGG-16 ImageNet checkpoint: it has no features.0.weight"):
        DeepLabLargeFOV(weights_path=tmp_path/'r.pth')
    torch.save(vgg_sd, tmp_path/'vgg.pth')
    with pytest.raises(ValueError, match=r"vgg\.pth' is not a ResNet-101 ImageNet checkpoint: it has no conv1.weight"):
        DeepLabResNet101(weights_path=tmp_path/'vgg.pth')

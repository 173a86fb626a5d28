"Segmentation networks: strict loading of torchvision checkpoints, offline errors, resume, evaluation paths."
import urllib.error
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision

from multiminer.segmentation import (DeepLabLargeFOV, DeepLabResNet101, SegConfig, SmallDeepLab, evaluate,
                                     load_segmentation_model, predict, predict_masks, train_segmentation)


from crafted_checkpoints import RunsCode, crafted


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def empty_hub(tmp_path):
    "torch.hub pointed at an empty folder, and any download raising URLError (no network is ever touched)."
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path/'hub'))
    def offline(*a, **k): raise urllib.error.URLError('no network in tests')
    with mock.patch('torch.hub.download_url_to_file', offline):
        yield tmp_path/'hub'
    torch.hub.set_dir(old)


def test_largefov_loads_vgg16_features_strictly(tmp_path):
    feats = torchvision.models.vgg16().features
    # the bare `features` state dict ...
    torch.save(feats.state_dict(), tmp_path/'features.pth')
    m = DeepLabLargeFOV(21, weights_path=tmp_path/'features.pth')
    for (k, v), (k2, v2) in zip(feats.state_dict().items(), m.features.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # ... and the layout of torchvision's checkpoint file ('features.*' + 'classifier.*')
    sd = {f'features.{k}': v for k, v in feats.state_dict().items()} | {'classifier.6.bias': torch.zeros(1000)}
    torch.save(sd, tmp_path/'vgg16.pth')
    m = DeepLabLargeFOV(21, weights_path=tmp_path/'vgg16.pth')
    assert torch.equal(m.features[28].weight, feats[28].weight)
    # a checkpoint missing a layer is refused (strict)
    del sd['features.0.bias']; torch.save(sd, tmp_path/'broken.pth')
    with pytest.raises(RuntimeError, match='0.bias'):
        DeepLabLargeFOV(21, weights_path=tmp_path/'broken.pth')


def test_largefov_pretrained_reads_hub_cache(empty_hub):
    "pretrained=True with the checkpoint already in torch.hub's folder needs no download."
    feats = torchvision.models.vgg16().features
    (empty_hub/'checkpoints').mkdir(parents=True)
    torch.save({f'features.{k}': v for k, v in feats.state_dict().items()},
               empty_hub/'checkpoints'/'vgg16-397923af.pth')
    m = DeepLabLargeFOV(21, pretrained=True, progress=False)
    assert torch.equal(m.features[0].weight, feats[0].weight)


@pytest.mark.parametrize('cls,fname', [(DeepLabLargeFOV, 'vgg16-397923af.pth'),
                                       (DeepLabResNet101, 'resnet101-63fe2227.pth')])
def test_pretrained_offline_message(empty_hub, cls, fname):
    with pytest.raises(RuntimeError) as e:
        cls(21, pretrained=True, progress=False)
    msg = str(e.value)
    for s in ['offline', fname, str(empty_hub/'checkpoints'), 'weights_path', 'https://download.pytorch.org']:
        assert s in msg, s


def test_resnet101_loads_torchvision_checkpoint_strictly(tmp_path):
    tv = torchvision.models.resnet101()
    torch.save(tv.state_dict(), tmp_path/'r101.pth')          # includes fc.*, which is dropped
    m = DeepLabResNet101(21, weights_path=tmp_path/'r101.pth')
    assert torch.equal(m.backbone.layer4[2].conv3.weight, tv.layer4[2].conv3.weight)
    assert torch.equal(m.backbone.bn1.running_var, tv.bn1.running_var)
    sd = tv.state_dict(); del sd['layer1.0.conv1.weight']; torch.save(sd, tmp_path/'broken.pth')
    with pytest.raises(RuntimeError, match='layer1.0.conv1.weight'):
        DeepLabResNet101(21, weights_path=tmp_path/'broken.pth')


def test_parameter_counts():
    with torch.device('meta'):
        assert sum(p.numel() for p in DeepLabLargeFOV(21).parameters()) == 20_505_429
        assert sum(p.numel() for p in DeepLabResNet101(21).parameters()) == 44_048_532


def test_small_deeplab_stride_4():
    m8, m4 = SmallDeepLab(5).eval(), SmallDeepLab(5, stride=4).eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert m8.features(x).shape == (2, 64, 12, 12) and m4.features(x).shape == (2, 64, 24, 24)
        assert m4(x).shape == m8(x).shape == (2, 5, 96, 96)
    with pytest.raises(ValueError, match='stride must be 4 or 8'): SmallDeepLab(5, stride=2)


def test_small_deeplab_stride_4_trains_and_reloads(tmp_path):
    cfg, x, y = _tiny()
    cfg = SegConfig(**{**cfg.to_dict(), 'epochs': 1, 'model_kwargs': {**cfg.model_kwargs, 'stride': 4}})
    net = train_segmentation(cfg, x, y, out_dir=tmp_path, progress=False)
    back = load_segmentation_model(tmp_path)
    assert net.features.stride == back.features.stride == 4
    assert torch.equal(predict_masks(net, x[:2]), predict_masks(back, x[:2]))


def _tiny():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 32, 32, generator=g)
    y = (x[:, 0] > 0.5).long(); y[:, :, :2] = 255
    cfg = SegConfig.synthetic(n_classes=2, crop_size=24, batch_size=4, epochs=3,
                              model_kwargs=dict(width=16, widths=(8, 8, 8), out_channels=8))
    return cfg, x, y


def test_resume_gives_the_same_weights(tmp_path):
    cfg, x, y = _tiny()
    full = train_segmentation(cfg, x, y, out_dir=tmp_path/'a', progress=False)
    def crash(info):
        if info['epoch'] == 2: raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_segmentation(cfg, x, y, out_dir=tmp_path/'b', progress=False, callback=crash)
    assert not (tmp_path/'b'/'model.pt').exists()
    resumed = train_segmentation(cfg, x, y, out_dir=tmp_path/'b', resume=True, progress=False)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # resuming a finished run trains no further
    again = train_segmentation(cfg, x, y, out_dir=tmp_path/'b', resume=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values()))
    # a different seed gives different weights (the equality above is not vacuous)
    other = train_segmentation(SegConfig(**{**cfg.to_dict(), 'seed': 1}), x, y, progress=False)
    assert not torch.equal(other.fc8.weight, full.fc8.weight)
    loaded = load_segmentation_model(tmp_path/'a')
    assert isinstance(loaded, SmallDeepLab) and not loaded.training
    assert torch.equal(loaded.fc8.weight, full.fc8.weight)


def test_training_accepts_a_dataset_of_triples():
    cfg, x, y = _tiny()
    ds = [(x[i], torch.zeros(1), y[i]) for i in range(len(x))]
    class DS(torch.utils.data.Dataset):
        def __len__(self): return len(ds)
        def __getitem__(self, i): return ds[i]
    a = train_segmentation(SegConfig(**{**cfg.to_dict(), 'epochs': 1}), DS(), progress=False)
    b = train_segmentation(SegConfig(**{**cfg.to_dict(), 'epochs': 1}), x, y, progress=False)
    assert torch.equal(a.fc8.weight, b.fc8.weight)


def test_predict_and_evaluate_inputs():
    torch.manual_seed(0)
    m = SmallDeepLab(3, widths=(8, 8, 8), out_channels=8, width=16).eval()
    x = torch.rand(3, 3, 40, 44)
    y = predict_masks(m, x)
    assert evaluate(m, x, y) == 100.
    # a Dataset of (image, labels, mask) of different sizes, with CRF
    items = [(x[0], None, y[0]), (x[1, :, :32, :36], None, y[1, :32, :36])]
    class DS(torch.utils.data.Dataset):
        def __len__(self): return len(items)
        def __getitem__(self, i): return items[i]
    score, conf = evaluate(m, DS(), crf=True, scales=(0.75, 1.0), flip=True, return_confusion=True)
    assert conf.sum() == 40 * 44 + 32 * 36 and 0 <= score <= 100
    crf = predict_masks(m, [x[0]], crf=True)
    assert crf[0].shape == (40, 44) and crf[0].dtype == torch.int64
    p = predict(m, x[:1].mul(255).byte().float().div(255))
    assert p.shape == (1, 3, 40, 44)
    with pytest.raises(ValueError, match='masks'):
        evaluate(m, x, None)
    with pytest.raises(ValueError, match=r'\(N, 3, H, W\)'):
        predict(m, torch.rand(2, 40, 44))


def test_voc_dataset_plugs_in(tmp_path):
    "voc_dataset(transform=None) items (image in [0,1], labels, mask) of varied sizes train and evaluate as they are."
    from multiminer.data import make_voc_fixture, voc_dataset
    make_voc_fixture(tmp_path)
    train, val = voc_dataset(tmp_path, 'train_aug'), voc_dataset(tmp_path, 'val')
    cfg = SegConfig.synthetic(n_classes=21, crop_size=32, scale_range=(0.5, 1.5), batch_size=2, epochs=1,
                              model_kwargs=dict(width=16, widths=(8, 8, 8), out_channels=8))
    m = train_segmentation(cfg, train, progress=False)
    score, conf = evaluate(m, val, return_confusion=True, crf=True)
    assert conf.shape == (21, 21) and conf.sum() == sum(int((val[i][2] != 255).sum()) for i in range(len(val)))
    from multiminer.data import voc_transforms
    with pytest.raises(ValueError, match=r'\[0, 1\]'):   # normalised images are refused with a hint
        evaluate(m, voc_dataset(tmp_path, 'val', transform=voc_transforms(train=False)))


def test_crf_workers_give_the_serial_result():
    torch.manual_seed(0)
    m = SmallDeepLab(3, widths=(8, 8, 8), out_channels=8, width=16).eval()
    x = torch.rand(5, 3, 40, 44)
    serial = predict_masks(m, x, crf=True)
    assert torch.equal(predict_masks(m, x, crf=True, crf_workers=2), serial)
    y = predict_masks(m, x)
    assert evaluate(m, x, y, crf=True, crf_workers=2) == evaluate(m, x, y, crf=True)


def test_load_segmentation_model_refuses_code(tmp_path):
    marker = tmp_path/'pwned_x'
    crafted(tmp_path/'model.pt', marker, config={}, model={})
    with pytest.raises(ValueError, match=r"refused to load '.*model\.pt'"): load_segmentation_model(tmp_path)
    assert not marker.exists()


def test_resume_refuses_code(tmp_path):
    cfg, x, y = _tiny()
    marker = tmp_path/'pwned_x'
    crafted(tmp_path/'checkpoint.pt', marker, config=cfg.to_dict())
    with pytest.raises(ValueError, match=r"refused to load '.*checkpoint\.pt'"):
        train_segmentation(cfg, x, y, out_dir=tmp_path, resume=True, progress=False)
    assert not marker.exists()


def test_checkpoints_are_plain(tmp_path):
    cfg, x, y = _tiny()
    train_segmentation(SegConfig(**{**cfg.to_dict(), 'epochs': 1}), x, y, out_dir=tmp_path, progress=False)
    for name in ('checkpoint.pt', 'model.pt'):
        assert isinstance(torch.load(tmp_path/name, weights_only=True)['config'], dict)


def test_a_diverged_training_stops_before_its_checkpoint(tmp_path):
    "Images of nan make the weights nan in the first epoch: a UserError names it, and no checkpoint or model is written."
    from multiminer.runtime import UserError
    cfg, x, y = _tiny()
    with pytest.raises(UserError, match='training diverged in epoch 1'):
        train_segmentation(cfg, x * float('nan'), y, out_dir=tmp_path, progress=False)
    assert not (tmp_path/'model.pt').exists() and not (tmp_path/'checkpoint.pt').exists()

"Tests of multiminer.classifier: shapes, freezing, parameter groups, checkpoint/resume, the VOC preset."
import dataclasses

import pytest
import torch
from torch.utils.data import Dataset

from multiminer.classifier import (Classifier, ClassifierConfig, build_classifier, compute_cams, evaluate_classifier,
                                   freeze, load_classifier, make_optimizer, train_classifier)
from multiminer.models import SmallExtractor, count_parameters


from crafted_checkpoints import RunsCode, crafted


class Toy(Dataset):
    "Random images whose labels say which colour channels hold a bright square."
    def __init__(self, n=16, size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = (torch.rand(n, 3, generator=g) > 0.5).float()
        self.images = torch.rand(n, 3, size, size, generator=g) * 0.2
        self.images[:, :, 8:20, 8:20] += self.labels[:, :, None, None] * 0.8
        self.masks = torch.zeros(n, size, size, dtype=torch.long)
    def __len__(self): return len(self.labels)
    def __getitem__(self, i): return self.images[i], self.labels[i], self.masks[i]


class Interrupted(Toy):
    "Fails in the middle of the second epoch, like a killed job."
    calls = 0
    def __getitem__(self, i):
        Interrupted.calls += 1
        if Interrupted.calls > len(self) + 4: raise KeyboardInterrupt('simulated interruption')
        return super().__getitem__(i)


def tiny_cfg(**kw):
    return ClassifierConfig.synthetic(**{**dict(small_widths=(4, 4, 8), small_out_channels=8, modulator_width=8,
                                                input_size=32, batch_size=4, epochs=2, lr_step_epoch=1), **kw})


def test_voc_preset_is_the_papers():
    c = ClassifierConfig.voc()
    assert (c.extractor, c.pretrained, c.input_size, c.batch_size, c.epochs) == ('vgg16', True, 321, 64, 50)
    assert (c.lr_extractor, c.lr_modulator, c.lr_step_epoch, c.lr_gamma) == (1e-3, 1e-2, 30, 0.1)
    assert (c.weight_decay, c.optimizer, c.momentum, c.modulator_width) == (1e-4, 'sgd', 0.9, 1024)


def test_bad_config():
    with pytest.raises(ValueError, match='optimizer'): ClassifierConfig(optimizer='rmsprop')
    with pytest.raises(ValueError, match='extractor'): ClassifierConfig(extractor='resnet')


def test_shapes():
    clf = build_classifier(tiny_cfg(), n_classes=5)
    x = torch.rand(3, 3, 40, 40)
    assert clf(x).shape == (3, 5) and clf.cam(x).shape == (3, 5, 5, 5) and clf.n_classes == 5
    cams = compute_cams(clf, x, batch_size=2)
    assert cams.shape == (3, 5, 40, 40) and cams.min() >= 0 and cams.max() <= 1
    assert compute_cams(clf, x, size=(7, 9)).shape == (3, 5, 7, 9)


def test_small_stride_is_passed_to_the_extractor():
    assert ClassifierConfig().small_stride == ClassifierConfig.synthetic().small_stride == 8
    x = torch.rand(2, 3, 32, 32)
    for stride, side in ((8, 4), (4, 8)):
        clf = build_classifier(tiny_cfg(small_stride=stride), n_classes=3)
        assert clf.extractor.stride == stride and clf.cam(x).shape == (2, 3, side, side)
    with pytest.raises(ValueError, match='small_stride must be 4 or 8'): ClassifierConfig(small_stride=16)


def test_small_stride_survives_a_checkpoint(tmp_path):
    clf = train_classifier(tiny_cfg(small_stride=4, epochs=1), Toy(), progress=False, out_dir=tmp_path)
    back = load_classifier(tmp_path)
    assert back.extractor.stride == 4
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(back.eval()(x), clf.eval()(x))


def test_vgg_classifier_builds():
    clf = build_classifier(ClassifierConfig.voc(pretrained=False, modulator_width=16), n_classes=20)
    assert clf.extractor.out_channels == 512 and clf.modulator.n_classes == 20


def test_param_groups_have_configured_lrs():
    for opt_name in ('sgd', 'adam'):
        cfg = tiny_cfg(optimizer=opt_name, lr_extractor=0.123, lr_modulator=0.456, weight_decay=1e-3)
        clf = build_classifier(cfg, 3)
        opt, sched = make_optimizer(cfg, clf)
        ext, mod = opt.param_groups
        assert (ext['lr'], mod['lr']) == (0.123, 0.456) and ext['weight_decay'] == 1e-3
        assert {id(p) for p in ext['params']} == {id(p) for p in clf.extractor.parameters()}
        assert {id(p) for p in mod['params']} == {id(p) for p in clf.modulator.parameters()}
        opt.step(); sched.step()  # lr_step_epoch=1: divided by 10 after the first epoch
        assert opt.param_groups[0]['lr'] == pytest.approx(0.0123) and opt.param_groups[1]['lr'] == pytest.approx(0.0456)


def test_freeze():
    clf = build_classifier(tiny_cfg(), 3)
    before = [p.clone() for p in clf.extractor.parameters()]
    assert freeze(clf.extractor) is clf.extractor
    assert count_parameters(clf.extractor, trainable_only=True) == 0 and not clf.extractor.training
    opt, _ = make_optimizer(tiny_cfg(), clf)
    assert [g['name'] for g in opt.param_groups] == ['modulator']
    torch.nn.functional.binary_cross_entropy_with_logits(clf(torch.rand(2, 3, 32, 32)), torch.ones(2, 3)).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, clf.extractor.parameters()))


def test_train_reports_history_and_learns():
    ds = Toy(32)
    clf = train_classifier(tiny_cfg(epochs=6, lr_step_epoch=None, lr_extractor=1e-2, lr_modulator=1e-2), ds,
                           progress=False)
    assert [h['epoch'] for h in clf.history] == list(range(1, 7))
    assert clf.history[-1]['loss'] < clf.history[0]['loss']
    assert set(evaluate_classifier(clf, ds)) == {'loss', 'label_acc', 'exact_acc'}


def test_resizes_to_input_size():
    clf = train_classifier(tiny_cfg(epochs=1, input_size=24), Toy(8, size=40), progress=False)
    assert isinstance(clf, Classifier)


def test_resume_continues_from_saved_epoch(tmp_path, capsys):
    cfg = tiny_cfg()
    straight = train_classifier(cfg, Toy(), progress=False)

    Interrupted.calls = 0
    with pytest.raises(KeyboardInterrupt): train_classifier(cfg, Interrupted(), out_dir=tmp_path, progress=False)
    ck = torch.load(tmp_path/'classifier.pt', weights_only=False)
    assert ck['epoch'] == 1 and len(ck['history']) == 1
    assert {'model', 'optimizer', 'scheduler', 'rng', 'config'} <= set(ck)

    resumed = train_classifier(cfg, Toy(), out_dir=tmp_path, resume=True, progress=True)
    out = capsys.readouterr().out
    assert 'after epoch 1' in out and 'epoch   1/2' not in out and 'epoch   2/2' in out
    assert [h['epoch'] for h in resumed.history] == [1, 2]
    assert resumed.history[1]['lr'] == straight.history[1]['lr'] == pytest.approx([cfg.lr_extractor / 10, cfg.lr_modulator / 10])
    # same batches, same RNG, same optimiser state: the resumed run ends where the uninterrupted one does
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    assert torch.load(tmp_path/'classifier.pt', weights_only=False)['epoch'] == 2

    again = load_classifier(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(again.eval()(x), resumed.eval()(x), atol=1e-6)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    clf = train_classifier(tiny_cfg(epochs=1), Toy(8), out_dir=tmp_path, resume=True, progress=False)
    assert len(clf.history) == 1
    with pytest.raises(ValueError, match='out_dir'): train_classifier(tiny_cfg(), Toy(8), resume=True)


def test_load_classifier_refuses_code(tmp_path):
    marker = tmp_path/'pwned_x'
    crafted(tmp_path/'classifier.pt', marker, config={}, n_classes=3)
    with pytest.raises(ValueError, match=r"refused to load '.*classifier\.pt'"): load_classifier(tmp_path)
    assert not marker.exists()


def test_resume_refuses_code(tmp_path):
    marker = tmp_path/'pwned_x'
    crafted(tmp_path/'classifier.pt', marker, config={}, epoch=1)
    with pytest.raises(ValueError, match=r"refused to load '.*classifier\.pt'"):
        train_classifier(tiny_cfg(), Toy(), progress=False, out_dir=tmp_path, resume=True)
    assert not marker.exists()


def test_checkpoint_is_plain(tmp_path):
    "What train_classifier writes loads with weights_only=True, random states included."
    train_classifier(tiny_cfg(epochs=1), Toy(), progress=False, out_dir=tmp_path)
    ck = torch.load(tmp_path/'classifier.pt', weights_only=True)
    assert isinstance(ck['config'], dict) and ck['config']['small_stride'] == 8 and ck['epoch'] == 1


class GoesBad(Toy):
    "Its images turn to nan in the second epoch: the weights do too, after the first step."
    calls = 0
    def __getitem__(self, i):
        GoesBad.calls += 1
        img, y, m = super().__getitem__(i)
        return (img * float('nan') if GoesBad.calls > len(self) else img), y, m


def test_a_diverged_training_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    "Weights that stop being finite end the training with a UserError naming the epoch; the checkpoint before it stays."
    from multiminer.runtime import UserError
    with pytest.raises(UserError, match='training diverged in epoch 2'):
        train_classifier(tiny_cfg(epochs=3), GoesBad(), progress=False, out_dir=tmp_path)
    ck = torch.load(tmp_path/'classifier.pt', weights_only=True)
    assert ck['epoch'] == 1 and all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())

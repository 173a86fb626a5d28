"""The training stages under `torchrun` (issue 14): two gloo processes on the CPU write what one process writes.

Each stage runs once in this process and once as `torchrun --nproc_per_node 2 -m multiminer.cli ...`; the checkpoints
and the mining result must agree within the tolerances `14_distributed` states and measures: the same mining
decisions, weights and maps apart only by the order of floating-point sums.
"""
import os, subprocess, sys

import pytest
import torch

from multiminer.cli import load_mining_result
from multiminer.runtime import read_run
from multiminer.models import load_checkpoint
from cli_helpers import run_cli, ok, _one_thread

SYN = ['--data', 'shapes', '--n-images', 40, '--image-size', 48, '--seed', 0]


def torchrun(*argv, procs=2):
    "`torchrun --nproc_per_node procs -m multiminer.cli *argv --quiet`: its exit code and stderr."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}', '-m', 'multiminer.cli',
           *[str(a) for a in argv], '--quiet']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return r.returncode, r.stderr


def gap(a: dict, b: dict) -> float:
    "The largest absolute difference between two state dicts' floating-point tensors."
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
    "Every training stage run in one process (…1) and on two ranks (…2); the mining and train-seg of both start from the one-process inputs."
    d = tmp_path_factory.mktemp('dist')
    ok('train-classifier', *SYN, '--epochs', 2, '--out', d/'c1')
    code, err = torchrun('train-classifier', *SYN, '--epochs', 2, '--out', d/'c2')
    assert code == 0, err
    ok('mine', '--classifier', d/'c1', '--max-steps', 3, '--out', d/'m1')
    code, err = torchrun('mine', '--classifier', d/'c1', '--max-steps', 3, '--out', d/'m2')
    assert code == 0, err
    ok('pseudo-labels', '--mining', d/'m1', '--out', d/'p1')
    ok('train-seg', '--pseudo', d/'p1', '--epochs', 1, '--out', d/'s1')
    code, err = torchrun('train-seg', '--pseudo', d/'p1', '--epochs', 1, '--out', d/'s2')
    assert code == 0, err
    return d


def test_classifier_matches_one_process(chain):
    assert read_run(chain/'c2')['finished'] is True
    a, b = (load_checkpoint(chain/c/'classifier.pt')['model'] for c in ('c1', 'c2'))
    assert gap(a, b) < 1e-4
    h1, h2 = (load_checkpoint(chain/c/'classifier.pt')['history'] for c in ('c1', 'c2'))
    assert [round(h['loss'], 4) for h in h1] == [round(h['loss'], 4) for h in h2]   # the epochs' losses, summed over ranks


def test_mining_matches_one_process(chain):
    (r1, x1), (r2, x2) = load_mining_result(chain/'m1'), load_mining_result(chain/'m2')
    assert torch.equal(r1.steps, r2.steps) and torch.equal(r1.stop_reason, r2.stop_reason)
    d = (r1.merged - r2.merged).abs()   # min-max normalised maps: a nearly flat one magnifies rounding (14_distributed)
    assert float(d.mean()) < 1e-3 and float(d.max()) < 0.2
    assert float(((r1.merged < 0.5) != (r2.merged < 0.5)).float().mean()) < 1e-3   # mined or not: the same positions
    assert len(r1.history) == len(r2.history) and x1['names'] == x2['names']
    assert read_run(chain/'m2')['finished'] is True


def test_segmentation_matches_one_process(chain):
    a, b = (load_checkpoint(chain/s/'model.pt')['model'] for s in ('s1', 's2'))
    assert gap(a, b) < 0.02
    assert read_run(chain/'s2')['finished'] is True


def test_other_stages_refuse_torchrun(chain):
    code, err = torchrun('pseudo-labels', '--mining', chain/'m1', '--out', chain/'p2')
    assert code != 0 and 'runs in one process' in err
    assert not (chain/'p2').exists()


def test_mining_resumed_on_two_ranks_matches_one_uninterrupted_process(chain):
    "One step on two ranks, then `--resume` to three on two ranks: the decisions of one process mining three steps at once."
    for steps, more in ((1, ()), (3, ('--resume',))):
        code, err = torchrun('mine', '--classifier', chain/'c1', '--max-steps', steps, '--out', chain/'m3', *more)
        assert code == 0, err
    (r1, _), (r3, _) = load_mining_result(chain/'m1'), load_mining_result(chain/'m3')
    assert torch.equal(r1.steps, r3.steps) and torch.equal(r1.stop_reason, r3.stop_reason) and len(r3.history) == 3
    assert float((r1.merged - r3.merged).abs().mean()) < 1e-3

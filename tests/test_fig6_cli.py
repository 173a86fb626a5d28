"Fig. 6 from the command line (issue 13): `mine --by-steps`, `mine --snapshots` and `pseudo-labels --steps T` on tiny synthetic data."
import json

import torch

from multiminer.pipeline import load_mining_result, synthetic_split
from multiminer.runtime import read_run
from multiminer.runtime import file_sha256
from multiminer.demo import pseudo_miou
from cli_helpers import run_cli, ok, _one_thread

SYN = ['--data', 'synthetic', '--n-images', 16, '--image-size', 32]


def test_by_steps_is_the_demos_score_and_resumes(tmp_path):
    ok('train-classifier', *SYN, '--epochs', 1, '--out', tmp_path/'c')
    m = tmp_path/'m'
    ok('mine', '--classifier', tmp_path/'c', '--out', m, '--max-steps', 1, '--by-steps', '--snapshots')
    first = json.loads((m/'summary.json').read_text())['miou_by_steps']
    # resumed with a larger cap and the same options: the curve goes on, its first value kept
    ok('mine', '--classifier', tmp_path/'c', '--out', m, '--max-steps', 2, '--by-steps', '--snapshots', '--resume')
    s, rec = json.loads((m/'summary.json').read_text()), read_run(m)
    curve = s['miou_by_steps']
    assert len(curve) == s['steps_run'] == 2 and curve[0] == first[0]
    assert sorted(rec['outputs']) == ['mining_result.pt', 'snapshots/step_1.pt', 'snapshots/step_2.pt']
    # the last value is the demo's (batched) pseudo-mask mIoU of the finished result, and what pseudo-labels prints
    r, extra = load_mining_result(m)
    ds = synthetic_split(rec['data'])
    assert abs(curve[-1] - pseudo_miou(r.strength(), extra['labels'], ds.masks, r.mined_threshold)) < 1e-9
    ok('pseudo-labels', '--mining', m, '--out', tmp_path/'p')
    assert json.loads((tmp_path/'p'/'summary.json').read_text())['miou'] == round(curve[-1], 2)
    ok('pseudo-labels', '--mining', m, '--out', tmp_path/'p2', '--steps', 2)
    assert torch.equal(torch.load(tmp_path/'p'/'pseudo_masks.pt'), torch.load(tmp_path/'p2'/'pseudo_masks.pt'))
    # other Fig. 6 options than the run was started with: refused, naming the option
    code, _, err = run_cli('mine', '--classifier', tmp_path/'c', '--out', m, '--max-steps', 3, '--resume')
    assert code == 2 and '--by-steps given then, not given now' in err and '--snapshots given then' in err, err
    # a snapshot changed after mining is refused like any other output
    snap = m/'snapshots'/'step_1.pt'
    d = torch.load(snap, weights_only=True); d['merged'][0] = 0; torch.save(d, snap)
    code, _, err = run_cli('pseudo-labels', '--mining', m, '--out', tmp_path/'p3', '--steps', 1)
    assert code == 2 and 'step_1.pt changed after' in err, err
    # --force without the options: the old snapshots and figure go, and --steps is refused with a reason
    ok('mine', '--classifier', tmp_path/'c', '--out', m, '--max-steps', 1, '--force')
    assert not (m/'snapshots').exists() and not (m/'fig_miou_by_steps.png').exists()
    assert 'miou_by_steps' not in json.loads((m/'summary.json').read_text()) and list(read_run(m)['outputs']) == ['mining_result.pt']
    code, _, err = run_cli('pseudo-labels', '--mining', m, '--out', tmp_path/'p4', '--steps', 1)
    assert code == 2 and 'was mined without --snapshots' in err and not (tmp_path/'p4').exists(), err
    code, _, err = run_cli('mine', '--classifier', tmp_path/'c', '--out', m, '--max-steps', 2, '--resume', '--by-steps')
    assert code == 2 and '--by-steps not given then, given now' in err, err

"Every `multiminer <subcommand>` that the VOC recipe (nbs/10_voc_recipe.ipynb) tells people to run must exist."
import json, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT/'nbs'/'10_voc_recipe.ipynb'


def cell_texts(path=RECIPE):
    "The text of each cell of a notebook (markdown and code), with `\\` continuations joined."
    return [re.sub(r'\\\n\s*', ' ', ''.join(cell['source'])) for cell in json.loads(Path(path).read_text())['cells']]


def recipe_commands(path=RECIPE):
    "The `multiminer ...` command lines of a notebook (markdown and code cells), with `\\` continuations joined."
    cmds = [m.group(0).strip() for text in cell_texts(path) for m in re.finditer(r'^\s*(?:#\s*)?multiminer [^\n`]*', text, re.M)]
    return [' '.join(re.sub(r'^#\s*', '', c).split()) for c in cmds]


def subcommands(path=RECIPE):
    return sorted({c.split()[1] for c in recipe_commands(path)})


def test_recipe_lists_every_stage():
    assert set(subcommands()) >= {'train-classifier', 'mine', 'pseudo-labels', 'train-seg', 'evaluate'}
    assert all('--out' in c for c in recipe_commands()), recipe_commands()


def test_extraction_sees_continued_lines(tmp_path):
    nb = {'cells': [{'cell_type': 'markdown', 'source': ['```bash\n', 'multiminer mine --a 1 \\\n', '    --out x\n', '```\n']}]}
    p = tmp_path/'nb.ipynb'; p.write_text(json.dumps(nb))
    assert recipe_commands(p) == ['multiminer mine --a 1 --out x']


@pytest.mark.parametrize('sub', subcommands())
def test_subcommand_help_exits_0(sub):
    r = subprocess.run([sys.executable, '-m', 'multiminer.cli', sub, '--help'], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, f"`multiminer {sub} --help` failed ({r.returncode}):\n{r.stderr[-2000:]}"


def torchrun_commands(path=RECIPE):
    "The `multiminer` arguments of the recipe's `torchrun ... -m multiminer.cli ...` lines, `\\` continuations joined."
    return [m.group(1).split() for text in cell_texts(path)
            for m in re.finditer(r'^\s*torchrun [^\n`]*?-m multiminer\.cli ([^\n`]*)', text, re.M)]


def test_torchrun_lines_are_the_training_stages_and_parse():
    "Every multi-GPU command of the recipe names a stage that trains on several processes, with options that parse."
    from multiminer.cli import DISTRIBUTED, build_parser
    cmds = torchrun_commands()
    assert sorted({c[0] for c in cmds}) == sorted(DISTRIBUTED)
    for c in cmds: assert build_parser().parse_args(c).command == c[0]

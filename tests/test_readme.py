"README.md and the docs home page nbs/index.ipynb must give the same two set-up commands."
import importlib.util, json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location('readme_commands', ROOT/'.ci'/'readme_commands.py')
rc = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(rc)

def test_readme_has_install_and_test_commands():
    cmds = rc.readme_commands()
    assert 'pip install' in cmds['install'] and 'multiminer demo' in cmds['install']
    assert 'nbdev_test' in cmds['test'] and 'pytest' in cmds['test']

def test_index_notebook_agrees_with_readme():
    cmds = rc.readme_commands()
    assert rc.index_commands() == [cmds['install'], cmds['test']]

def test_disagreement_is_detected(tmp_path):
    "The check above can fail: a home page whose command differs is caught."
    nb = json.loads((ROOT/'nbs'/'index.ipynb').read_text())
    for c in nb['cells']:
        if c['cell_type'] == 'markdown':
            c['source'] = ''.join(c['source']).replace('nbdev_test', 'nbdev_test --skip')
    p = tmp_path/'index.ipynb'; p.write_text(json.dumps(nb))
    assert rc.index_commands(p) != list(rc.readme_commands().values())

def test_readme_with_one_block_is_rejected(tmp_path):
    p = tmp_path/'README.md'; p.write_text("# x\n\n```sh\necho hi\n```\n")
    try: rc.readme_commands(p)
    except ValueError as e: assert 'exactly two' in str(e)
    else: raise AssertionError('a README with one sh block was accepted')

"""The set-up commands of README.md (written from nbs/index.ipynb, the docs home page, by `nbdev_readme`).

README.md holds exactly two ```sh blocks: the install-and-run-the-demo command, then the test command.
`.ci/run` runs them from here, and tests/test_readme.py checks that README.md and nbs/index.ipynb agree,
so the commands are written once and read by everything that needs them.

Usage: python3 .ci/readme_commands.py install|test
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# "```sh" as written in the index, "``` sh" as Quarto writes it into README.md
_SH_BLOCK = re.compile(r"``` ?sh\n(.*?)\n```", re.S)

def sh_blocks(text):
    "The contents of every ```sh fenced block in `text`, in order."
    return [b.strip() for b in _SH_BLOCK.findall(text)]

def readme_commands(path=ROOT/'README.md'):
    "The two set-up commands of README.md as a dict with keys 'install' and 'test'."
    blocks = sh_blocks(Path(path).read_text(encoding='utf-8'))
    if len(blocks) != 2: raise ValueError(f"{path} must hold exactly two ```sh blocks (install, test); found {len(blocks)}")
    return dict(install=blocks[0], test=blocks[1])

def index_commands(path=ROOT/'nbs'/'index.ipynb'):
    "The ```sh blocks of the markdown cells of the docs home page notebook."
    nb = json.loads(Path(path).read_text(encoding='utf-8'))
    text = "\n\n".join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    return sh_blocks(text)

if __name__ == '__main__':
    if len(sys.argv) != 2 or sys.argv[1] not in ('install', 'test'): sys.exit(__doc__)
    print(readme_commands()[sys.argv[1]])

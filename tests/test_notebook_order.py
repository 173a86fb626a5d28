"""The notebooks read in the sidebar's order, and none imports from one that comes later: a reader meets every
name before it is used, and the library's chapters build on each other in that order."""
import json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_IMPORT = re.compile(r'from multiminer\.(\w+) import|import multiminer\.(\w+)|from \.(\w+) import')


def sidebar_order(text):
    "The notebooks of sidebar.yml, in the order listed."
    return re.findall(r'^\s*-\s*([\w.]+\.ipynb)\s*$', text, re.M)


def imports_from_later(order, cells_of):
    "(notebook, module, the notebook that defines it) for every import of a chapter listed after the importer."
    module_of, found = {}, []
    for nb in order:
        for c in cells_of(nb):
            m = re.search(r'#\|\s*default_exp\s+(\w+)', ''.join(c['source']))
            if m: module_of[m.group(1)] = nb
    for i, nb in enumerate(order):
        if nb == 'index.ipynb': continue        # the landing page shows the demo's results, drawn by the chapters it links to
        for c in cells_of(nb):
            if c['cell_type'] != 'code': continue
            for m in _IMPORT.finditer(''.join(c['source'])):
                mod = next(g for g in m.groups() if g)
                src = module_of.get(mod)
                if src is not None and src != nb and order.index(src) > i: found.append((nb, mod, src))
    return found


def _cells(nb): return json.loads((ROOT/'nbs'/nb).read_text(encoding='utf-8'))['cells']


def test_no_notebook_imports_from_a_later_one():
    order = sidebar_order((ROOT/'nbs'/'sidebar.yml').read_text())
    assert len(order) == len(list((ROOT/'nbs').glob('*.ipynb')))
    assert imports_from_later(order, _cells) == []


def test_the_check_can_fail():
    nbs = {'a.ipynb': [dict(cell_type='code', source=['#| default_exp a\n', 'from multiminer.b import f'])],
           'b.ipynb': [dict(cell_type='code', source=['#| default_exp b\n', 'from multiminer.a import g'])]}
    assert imports_from_later(['a.ipynb', 'b.ipynb'], nbs.__getitem__) == [('a.ipynb', 'b', 'b.ipynb')]
    assert sidebar_order("contents:\n  - a.ipynb\n  - section: X\n    contents:\n      - b.ipynb\n") == ['a.ipynb', 'b.ipynb']

"""The text `show_doc` puts on the docs site must survive rendering.

What broke pages before: `<image id>` in a docstring is an HTML tag to the browser and vanishes
("mask_dir/.png"); a `*word*` inside the docstring's first line, which nbdev wraps in `*...*`, ends the italics;
TeX (`$H^t$`, `\\epsilon`) in a parameter comment is shown raw, since show_doc prints the signature and its
comments as a code block. Every public object of the package is checked (each module's `__all__`, and the
public methods and properties of its classes), as are the markdown cells and shown code cells of the notebooks.
"""
import importlib, inspect, json, pkgutil, re
from pathlib import Path

import pytest
from fastcore.docments import docments, docstring

import multiminer

ROOT = Path(__file__).resolve().parent.parent

_CODE_SPAN = re.compile(r'(`+)(?:(?!\1).)+?\1', re.S)         # `inline code` (HTML-safe)
_ANGLE = re.compile(r'<(?!\s|=|-|<)[^<>\n]*[^<>\s=-]>')         # <image id>, <t>; not "a < b", "<=", "->"
_STARS = re.compile(r'(?<![\w*])\*(?=\S)[^*\n]*\*(?!\*)')          # *other* (not 2*x or **kwargs)
_DASHES = re.compile(r'(?<![-\w`])--(?=[a-z])')                     # --out: Quarto's typography makes it "–out"
_LONE_STAR = re.compile(r'(?<=[(_/\[])\*|\*(?=[.)/\]])')             # fn(*job), eval_*.json: a star that ends the italics
_TEX = re.compile(r'\$[^$\n]+\$|\\[a-zA-Z]+')                     # $H^t$, \epsilon, \tilde
# HTML a notebook's markdown may use on purpose
_HTML_OK = re.compile(r'</?(br|img|p|div|span|sub|sup|details|summary|b|i|em|strong|code|a|table|tr|td|th|hr)\b[^<>]*/?>', re.I)

def _outside_code(text): return _CODE_SPAN.sub('', text)

def docstring_problems(doc):
    "What in a docstring would be lost or broken once show_doc renders it as markdown."
    probs = []
    prose = _outside_code(doc)
    for m in _ANGLE.findall(prose):
        if not _HTML_OK.fullmatch(m): probs.append(f'{m!r} is read as an HTML tag (write it in `backticks`)')
    first = _outside_code(doc.strip().split('\n')[0]) if doc.strip() else ''
    for m in _STARS.findall(first):
        probs.append(f'{m!r} in the first line ends nbdev\'s italics (use `backticks` or plain words)')
    if _LONE_STAR.search(first): probs.append('a lone * in the first line ends nbdev\'s italics (write the code in `backticks`)')
    for m in _DASHES.finditer(prose):
        probs.append(f'{prose[m.start():m.start() + 12]!r}: "--" outside `backticks` renders as an en dash')
    return probs

def comment_problems(comment):
    "What in a parameter comment would show raw: show_doc prints the signature with its comments as code."
    probs = [f'{m!r} is TeX, shown raw in a code block (write it in words or Unicode: H^t, ε, M̃)'
             for m in _TEX.findall(comment or '')]
    probs += [f'{m!r} reads as a tag' for m in _ANGLE.findall(comment or '') if not _HTML_OK.fullmatch(m)]
    return probs

def public_objects():
    "(qualified name, object) of every public object of every module of the package."
    for mi in pkgutil.iter_modules(multiminer.__path__):
        if mi.name.startswith('_'): continue
        mod = importlib.import_module(f'multiminer.{mi.name}')
        for name in getattr(mod, '__all__', []):
            obj = getattr(mod, name, None)
            if getattr(obj, '__module__', None) != mod.__name__: continue
            yield f'{mi.name}.{name}', obj
            if inspect.isclass(obj):
                for k, v in vars(obj).items():
                    if k.startswith('_') and k != '__init__': continue
                    if isinstance(v, (staticmethod, classmethod)): v = v.__func__
                    if isinstance(v, property): v = v.fget
                    if inspect.isfunction(v): yield f'{mi.name}.{name}.{k}', v

def object_problems(name, obj):
    probs = []
    if inspect.isclass(obj) or inspect.isfunction(obj):
        probs += [f'{name} docstring: {p}' for p in docstring_problems(docstring(obj))]
        try: dm = docments(obj, full=True)
        except Exception: dm = {}
        for arg, d in dm.items():
            probs += [f'{name}({arg}) comment: {p}' for p in comment_problems(getattr(d, 'docment', None))]
    return probs

def notebook_problems(path):
    "Markdown cells: tags the browser would eat. Shown code cells: TeX in a comment, shown raw."
    probs = []
    for i, c in enumerate(json.loads(Path(path).read_text(encoding='utf-8'))['cells']):
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown':
            text = re.sub(r'```.*?```', '', src, flags=re.S)
            text = re.sub(r'\$\$.*?\$\$|\$[^$\n]+\$', '', text, flags=re.S)   # TeX: `<` there is a relation
            for m in _ANGLE.findall(_outside_code(text)):
                if not _HTML_OK.fullmatch(m): probs.append(f'{Path(path).name} cell {i}: {m!r} is read as an HTML tag')
        elif c['cell_type'] == 'code' and not re.search(r'^#\|\s*(hide|echo:\s*false|include:\s*false)', src, re.M):
            for line in src.splitlines():
                if '#' in line and not line.lstrip().startswith('#|'):
                    comment = line[line.index('#'):]
                    if re.search(r'\$[^$\n]+\$', comment):
                        probs.append(f'{Path(path).name} cell {i}: TeX in a shown code comment: {comment.strip()!r}')
    return probs

# Offending text in chapters another session is rewriting right now: listed by name in that session's report
# and removed from here when fixed. Only names in this set are skipped.
KNOWN = set()   # names whose rendering problem is reported and not yet fixed (none now)

_OBJS = sorted(public_objects(), key=lambda t: t[0])
_NBS = sorted((ROOT/'nbs').glob('*.ipynb'))

def test_walks_the_whole_package():
    mods = {n.split('.')[0] for n, _ in _OBJS}
    assert {'core', 'data', 'models', 'mining', 'metrics', 'explorer', 'cli'} <= mods
    assert len(_OBJS) > 100

@pytest.mark.parametrize('name,obj', _OBJS, ids=[n for n, _ in _OBJS])
def test_show_doc_text_survives_rendering(name, obj):
    if name in KNOWN: pytest.skip('known, reported')
    assert object_problems(name, obj) == []

@pytest.mark.parametrize('path', _NBS, ids=[p.stem for p in _NBS])
def test_notebook_text_survives_rendering(path):
    if path.stem in KNOWN: pytest.skip('known, reported')
    assert notebook_problems(path) == []

def test_crafted_bad_examples_are_caught(tmp_path):
    "Each check can fail: the patterns that broke pages are caught, their safe spellings are not."
    def bad(F, # features $F^t$
            eps=1e-5, # $\epsilon$ of Eq. 5
            d='.'): # dir; writes d/<image id>.png
        "Read `d` and the *other* half."
    bad.__module__ = __name__
    p = object_problems('bad', bad)
    assert any('$F^t$' in x for x in p) and any('\\epsilon' in x for x in p)
    assert any('<image id>' in x for x in p) and any('*other*' in x for x in p)
    assert docstring_problems("Writes mask_dir/<image id>.png") and not docstring_problems("Writes `mask_dir/<image id>.png`")
    assert docstring_problems("Saves snapshots/step_<t>.pt") and not docstring_problems("True when a < b and b > c, 2*x*y")
    assert not docstring_problems("The first line.\n\nLater, *this* is plain markdown italics.")
    assert not comment_problems('features F^t, (N, D, h, w), ε > 0')
    assert docstring_problems("Check --out before any work") and not docstring_problems("Check `--out` before any work; a -- b")
    assert docstring_problems("Run fn(*job) for each job") and docstring_problems("Writes eval_*.json beside them")
    assert not docstring_problems("Run `fn(*job)` for each job; writes `eval_*.json`")
    nb = dict(cells=[dict(cell_type='markdown', source=['Writes runs/<name>/x.png; $a<b$ and `<ok>` <br>']),
                     dict(cell_type='code', source=['x = 1 # the map $M^t$']),
                     dict(cell_type='code', source=['#| hide\n', 'y = 2 # $M^t$ hidden'])])
    (tmp_path/'x.ipynb').write_text(json.dumps(nb))
    p = notebook_problems(tmp_path/'x.ipynb')
    assert len(p) == 2 and '<name>' in p[0] and '$M^t$' in p[1]

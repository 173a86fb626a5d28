"What the CLI test files share: `multiminer` run in this process, and one torch thread while they run."
import contextlib, io

import pytest
import torch

from multiminer.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    "Tests that import this fixture run with one torch thread (the CLI stages are small; two cores are shared)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(*argv):
    "Exit code, stdout and stderr of `multiminer *argv`, run in this process."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = main([str(a) for a in argv])
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()


def ok(*argv):
    "stdout of a `multiminer *argv --quiet` that must succeed (its stderr is the assertion's message)."
    code, out, err = run_cli(*argv, '--quiet')
    assert code == 0, err
    return out


def refused(needles, *argv):
    "Exit 2, no traceback, one error line holding every needle (a string or path, or a list of them)."
    code, out, err = run_cli(*argv, '--quiet')
    assert code == 2, (code, out, err)
    lines = [l for l in err.splitlines() if l.startswith(f'multiminer {argv[0]}: error: ')]
    assert 'Traceback' not in err and len(lines) == 1, err
    for n in ([needles] if isinstance(needles, (str, bytes)) or hasattr(needles, '__fspath__') else needles):
        assert str(n) in lines[0], (n, err)
    return lines[0]

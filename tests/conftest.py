import atexit
import os
import shutil
import sys
import tempfile

import pytest

# The suite runs in two worker processes (pytest.ini: -n 2), one per core; each of them,
# and every process a test starts, computes on one thread, or the two cores would be
# oversubscribed and everything slows down many times.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

# The scripts are flat files at the repository root, imported as modules by the tests.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Caches the code keeps between runs (evaluate.py's FID features) go to a folder of this
# test session, not to the user's home; every subprocess inherits it.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="cyclegan-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

# Each test file runs whole on one worker (pytest.ini: --dist loadfile). Handing out the
# longest files first lets the two workers finish at about the same time; pytest-xdist's own
# order (by number of tests) would leave the longest file for the end.
LONGEST_FIRST = ["test_train.py", "test_resume.py", "test_ddp.py", "test_gpu_check.py", "test_monitoring.py",
                 "test_evaluate.py", "test_bench.py", "test_download_pretrained.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture
def main_in_process(monkeypatch, capsys):
    """cyclegan.main(args) run in this process with `cwd` as the working folder, for runs that
    stop before training starts (a subprocess would spend ~7 s importing torch for one
    line of output): returns (exit code, stdout, stderr)."""
    def call(cwd, *args):
        from cyclegan import main
        monkeypatch.chdir(cwd)
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err
    return call

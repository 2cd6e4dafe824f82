import atexit
import os
import shutil
import sys
import tempfile

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

import os
import sys

# The scripts are flat files at the repository root, imported as modules by the tests.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

"""Shared test set-up: the project root on sys.path, the golden fixtures' location."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
GOLDEN = os.path.join(FIXTURES, 'xcit_golden')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

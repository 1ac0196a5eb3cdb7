"""Shared test set-up: the project root on sys.path, the golden fixtures' location, and a way
to make installed packages look absent."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
GOLDEN = os.path.join(FIXTURES, 'xcit_golden')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def hide_packages(monkeypatch, *names):
    """Makes ``importlib.util.find_spec`` report ``names`` as not installed, as on a machine without them."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *args: None if name in names else find_spec(name, *args))

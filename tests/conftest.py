"""Shared test set-up: the project root on sys.path, the golden fixtures' location and model
configs, a config with random weights, torch.save's zip layout, a way to make installed
packages look absent, and watching processes end."""
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
GOLDEN = os.path.join(FIXTURES, 'xcit_golden')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def write_golden_yaml(meta, path, **model):
    """A golden checkpoint's model (its JSON ``meta['config']``: MODEL keys, lower-cased) as a model
    YAML at ``path``, with ``model`` overrides (e.g. ``NUM_CLASSES=0``); returns the path."""
    import yaml
    with open(path, 'w', encoding='utf-8') as f:
        yaml.safe_dump({'MODEL': {**{k.upper(): v for k, v in meta['config'].items()}, **model}}, f)
    return str(path)


def write_torch_zip(path, data_pkl, storages=()):
    """A zip laid out like ``torch.save``'s: the pickle ``data_pkl`` and the ``(key, bytes)``
    storage files; returns the path as a string."""
    import zipfile
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('archive/data.pkl', data_pkl)
        archive.writestr('archive/byteorder', 'little')
        archive.writestr('archive/version', '3\n')
        for key, raw in storages:
            archive.writestr(f'archive/data/{key}', raw)
    return str(path)


def hide_packages(monkeypatch, *names):
    """Makes ``importlib.util.find_spec`` report ``names`` as not installed, as on a machine without them."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *args: None if name in names else find_spec(name, *args))


def random_model_files(folder, config_yaml, seed=1):
    """Writes ``config_yaml`` to ``folder``/tiny.yaml and the random initial weights of its model
    (``paddle.seed(seed)``) to ``folder``/tiny.pdparams; returns both paths as strings."""
    import paddle
    from config import get_config
    from xcit import build_xcit
    cfg = os.path.join(folder, 'tiny.yaml')
    with open(cfg, 'w', encoding='utf-8') as f:
        f.write(config_yaml)
    paddle.seed(seed)
    weights = os.path.join(folder, 'tiny.pdparams')
    paddle.save(build_xcit(get_config(cfg)).state_dict(), weights)
    return cfg, weights


def running(pid):
    """Whether process ``pid`` exists and is not a zombie (Linux: reads /proc)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rpartition(')')[2].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def wait_for(condition, seconds):
    """Calls ``condition()`` every 0.2 s until it is true or ``seconds`` have passed; returns its last value."""
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.2)
    return condition()

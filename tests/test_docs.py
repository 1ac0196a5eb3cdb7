"""The documentation as a contract: every command-line option, and its default, is described in
its script's ``--help``; the Python functions the READMEs name have the signatures they give; the
README names every file a training run writes."""
import argparse
import importlib
import inspect
import os
import re

import pytest

from conftest import ROOT

SCRIPTS = ['benchmark', 'eval_knn', 'export_model', 'main_multi_gpu', 'main_single_gpu', 'plot_metrics',
           'predict', 'visualize_attention', 'port_weights.convert', 'port_weights.convert_regnet']


class _ParserBuilt(Exception):
    """Raised instead of parsing, to hand the built parser back."""


def parser_of(module_name, monkeypatch):
    """The ``argparse`` parser that ``module_name``'s ``main`` builds (nothing runs)."""
    def capture(parser, *args, **kwargs):
        raise _ParserBuilt(parser)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', capture)
    with pytest.raises(_ParserBuilt) as built:
        importlib.import_module(module_name).main([])
    return built.value.args[0]


@pytest.mark.parametrize('module_name', SCRIPTS)
def test_every_option_is_described_in_the_help(module_name, monkeypatch):
    parser = parser_of(module_name, monkeypatch)
    undescribed = [action.option_strings[0] if action.option_strings else action.metavar or action.dest
                   for action in parser._actions if not action.help]
    assert undescribed == []


@pytest.mark.parametrize('module_name', SCRIPTS)
def test_every_default_value_is_stated_in_the_help(module_name, monkeypatch):
    parser = parser_of(module_name, monkeypatch)
    unstated = [action.option_strings[0] for action in parser._actions
                if action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and 'default' not in action.help]
    assert unstated == []


@pytest.mark.parametrize('name', ['load_checkpoint_arrays', 'convert_state_dict', 'convert_file'])
def test_port_weights_readme_gives_the_python_signatures(name):
    from port_weights import convert
    with open(os.path.join(ROOT, 'port_weights', 'README.md'), encoding='utf-8') as f:
        readme = ' '.join(f.read().split())
    assert f'{name}{inspect.signature(getattr(convert, name))}`' in readme


def test_readme_names_every_file_a_training_run_writes(tmp_path):
    """A one-epoch run on the digits with a tiny XCiT; the README's -output paragraph names each
    file it leaves (epoch_1.pdparams as epoch_N.pdparams)."""
    import main_single_gpu
    main_single_gpu.main(['-dataset', 'digits', '-batch_size', '64', '-output', str(tmp_path), '-opts',
                          'MODEL.PATCH_SIZE', '8', 'MODEL.EMBED_DIM', '32', 'MODEL.DEPTH', '1', 'MODEL.NUM_HEADS',
                          '2', 'MODEL.NUM_CLASSES', '10', 'DATA.IMAGE_SIZE', '32', 'DATA.NUM_WORKERS', '0',
                          'TRAIN.NUM_EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.MIXUP_PROB', '0.0',
                          'SAVE_FREQ', '1'])
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    paragraph = readme[readme.index('`-output DIR` receives'):]
    paragraph = paragraph[:paragraph.index('\n\n')]
    written = sorted(re.sub(r'_\d+\.', '_N.', p.name) for p in tmp_path.iterdir())
    assert [name for name in written if f'`{name}`' not in paragraph] == []

"""``hubconf.py``: every config is a Paddle Hub entry point (``paddle.hub`` with source='local')."""
import glob
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from utils import CheckpointError


def test_every_config_is_an_entry_and_nothing_else():
    names = paddle.hub.list(ROOT, source='local')
    configs = glob.glob(os.path.join(ROOT, 'configs', 'xcit_*.yaml')) + glob.glob(
        os.path.join(ROOT, 'configs', 'dino', '*.yaml'))
    assert sorted(names) == sorted(os.path.basename(p)[:-len('.yaml')] for p in configs)
    assert len(names) == 50
    doc = paddle.hub.help(ROOT, 'xcit_tiny_12_p8_384_dist', source='local')
    assert 'https://dl.fbaipublicfiles.com/xcit/xcit_tiny_12_p8_384_dist.pth' in doc
    assert 'configs/xcit_tiny_12_p8_384_dist.yaml' in doc


def test_load_builds_the_config_and_loads_every_weight(tmp_path):
    paddle.seed(3)
    model = paddle.hub.load(ROOT, 'xcit_nano_12_p16_224', source='local')
    assert sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient) == 3_053_224
    weights = str(tmp_path / 'nano.pdparams')
    paddle.save(model.state_dict(), weights)
    paddle.seed(4)
    loaded = paddle.hub.load(ROOT, 'xcit_nano_12_p16_224', source='local', pretrained=weights)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    backbone = paddle.hub.load(ROOT, 'xcit_small_12_p16_dino', source='local')
    assert backbone.num_classes == 0 and 'head.weight' not in backbone.state_dict()
    with pytest.raises(CheckpointError, match=r'does not fit the model of .*xcit_tiny_12_p16_224\.yaml'):
        paddle.hub.load(ROOT, 'xcit_tiny_12_p16_224', source='local', pretrained=weights)
    with pytest.raises(ValueError, match='use_ema selects the EMA weights of the pretrained checkpoint'):
        paddle.hub.load(ROOT, 'xcit_tiny_12_p16_224', source='local', use_ema=True)


CALLER_WITH_ITS_OWN_MODULES = '''\
import sys
import paddle
import utils  # the caller's own utils.py, beside this script, imported before the hub
model = paddle.hub.load(sys.argv[1], 'xcit_nano_12_p16_224', source='local')
import config  # the caller's own config.py, imported after the hub
import utils as again
print(type(model).__name__, utils.WHOSE, again is utils, config.WHOSE, 'xcit' in sys.modules)
'''


def test_a_callers_modules_of_the_same_names_stay_apart(tmp_path):
    """A caller with its own ``utils`` and ``config`` modules loads a hub model, and has its own
    after, whether it imported them before or after the hub."""
    for name in ('utils', 'config'):
        (tmp_path / f'{name}.py').write_text("WHOSE = 'the-caller'\n")
    (tmp_path / 'caller.py').write_text(CALLER_WITH_ITS_OWN_MODULES)
    done = subprocess.run([sys.executable, 'caller.py', ROOT], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ['XCiT', 'the-caller', 'True', 'the-caller', 'False']


def test_num_classes_loads_a_fine_tuned_checkpoint_and_its_ema(tmp_path):
    """A model fine-tuned on 3 classes (a training checkpoint of the entry's config) loads with
    num_classes=3, its EMA weights with use_ema; a bad num_classes names the keyword."""
    from config import ConfigError
    paddle.seed(5)
    tuned = paddle.hub.load(ROOT, 'xcit_nano_12_p16_224', source='local', num_classes=3)
    assert tuned.num_classes == 3 and tuned.head.weight.shape == [128, 3]
    weights = tuned.state_dict()
    ema = {name: value * 0.5 for name, value in weights.items()}
    checkpoint = str(tmp_path / 'last.pdparams')
    paddle.save({'model': weights, 'model_ema': ema, 'epoch': 2}, checkpoint)
    for use_ema, expected in ((False, weights), (True, ema)):
        loaded = paddle.hub.load(ROOT, 'xcit_nano_12_p16_224', source='local', pretrained=checkpoint,
                                 num_classes=3, use_ema=use_ema)
        for name, value in expected.items():
            np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    with pytest.raises(CheckpointError, match=r'head\.weight +\[128, 3\] +\[128, 1000\]'):
        paddle.hub.load(ROOT, 'xcit_nano_12_p16_224', source='local', pretrained=checkpoint)
    with pytest.raises(ConfigError, match='num_classes: MODEL.NUM_CLASSES must be >= 0, got -1'):
        paddle.hub.load(ROOT, 'xcit_nano_12_p16_224', source='local', num_classes=-1)


def test_num_classes_0_gives_the_backbone_without_head():
    """num_classes=0 (e.g. to load a DINO backbone into a supervised entry): no head, the model's
    outputs are the EMBED_DIM final-norm class-token features."""
    model = paddle.hub.load(ROOT, 'xcit_nano_12_p16_224', source='local', num_classes=0)
    assert model.num_classes == 0 and not any(name.startswith('head.') for name in model.state_dict())
    model.eval()
    with paddle.no_grad():
        assert model(paddle.zeros([1, 3, 32, 32])).shape == [1, 128]

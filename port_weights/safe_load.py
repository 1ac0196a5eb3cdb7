"""Reads PyTorch and safetensors checkpoints without torch and without running code from them.

Supported formats, recognised by content rather than by file name:

- PyTorch zip (``torch.save`` since 1.6): ``<archive>/data.pkl`` plus one raw file per
  storage under ``<archive>/data/<key>``, and ``<archive>/byteorder``;
- PyTorch legacy (``_use_new_zipfile_serialization=False``): a sequence of pickles followed
  by the raw storages, each prefixed by its element count as an int64, all little-endian;
- safetensors: an 8-byte little-endian header length, a JSON header, then raw data.

Pickles go through ``RestrictedUnpickler``, whose ``find_class`` hands out only the few
globals a tensor checkpoint refers to, replaced by harmless local stand-ins; any other
global (``os.system``, ``builtins.exec``, ...) stops the load with ``CheckpointError``.
Nor can a small file claim much memory: zip entries must be stored uncompressed (as
``torch.save`` stores them), a storage file must have the size its elements take, and
``materialize`` bounds what views of the storages may add.
Tensors come back as numpy arrays in their stored dtype, except bfloat16, which numpy lacks
and which is widened exactly to float32.
"""
import collections
import functools
import io
import json
import math
import os
import pickle
import struct
import types
import zipfile
import zlib

import numpy as np

__all__ = ['CheckpointError', 'RestrictedUnpickler', 'read_checkpoint']

BFLOAT16 = 'bfloat16'
# torch storage class -> numpy dtype (without byte order)
STORAGE_DTYPES = {
    'DoubleStorage': 'f8', 'FloatStorage': 'f4', 'HalfStorage': 'f2', 'BFloat16Storage': BFLOAT16,
    'LongStorage': 'i8', 'IntStorage': 'i4', 'ShortStorage': 'i2', 'CharStorage': 'i1',
    'ByteStorage': 'u1', 'BoolStorage': '?',
}
SAFETENSORS_DTYPES = {
    'F64': 'f8', 'F32': 'f4', 'F16': 'f2', 'BF16': BFLOAT16, 'I64': 'i8', 'I32': 'i4',
    'I16': 'i2', 'I8': 'i1', 'U8': 'u1', 'BOOL': '?',
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_SAFETENSORS_HEADER = 100 * 2 ** 20  # bytes
MAX_DEPTH = 100  # containers inside containers; a training checkpoint nests a few
MAX_EXPANDED = 2 ** 20  # elements at most of a tensor larger than its storage (an expanded, stride-0 view)
MAX_OVERLAP = 4  # a file's tensors together: at most this many times its storages' elements


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, unsupported or unsafe."""


# What the pickle builds is immutable: its BUILD opcode can set attributes on objects, and
# must not be able to alter a checked tensor record or the stand-ins shared between files.
StorageType = collections.namedtuple('StorageType', 'name dtype')
StorageType.__doc__ = """Stand-in for a ``torch.*Storage`` class named in a pickle."""
StorageRef = collections.namedtuple('StorageRef', 'key dtype numel')
StorageRef.__doc__ = """A storage the pickle refers to by persistent id, of ``numel`` elements; its data
is read afterwards."""
TensorRecord = collections.namedtuple('TensorRecord', 'storage offset size stride')
TensorRecord.__doc__ = """A tensor as the pickle describes it: a view of a storage, in elements."""


def _is_index(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor(storage, storage_offset, size, stride):
    size, stride = tuple(size), tuple(stride)
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f'malformed tensor record: storage is a {type(storage).__name__}')
    if not (_is_index(storage_offset) and len(size) == len(stride)
            and all(map(_is_index, size + stride))):
        raise CheckpointError(f'malformed tensor record: offset {storage_offset!r}, size {size!r}, '
                              f'stride {stride!r}')
    return TensorRecord(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
    if metadata:  # conjugate / negative bits: never set on the weights of a real model
        raise CheckpointError(f'unsupported tensor metadata {metadata!r}')
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    return data


REBUILDERS = {
    '_rebuild_tensor': _rebuild_tensor,
    '_rebuild_tensor_v2': _rebuild_tensor_v2,
    '_rebuild_parameter': _rebuild_parameter,
    '_rebuild_parameter_with_state': _rebuild_parameter,
}
ALLOWED_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch', 'Size'): tuple,
    ('argparse', 'Namespace'): types.SimpleNamespace,  # training arguments saved with the weights
}
ALLOWED_GLOBALS.update({('torch', name): StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles tensor checkpoints only: globals are the torch ``REBUILDERS`` and
    ``ALLOWED_GLOBALS``, or nothing.

    Tensors come out as ``TensorRecord``; the storages they refer to are collected in
    ``self.storages`` (key -> StorageRef) for the caller to read.
    """

    def __init__(self, file):
        super().__init__(file)
        self.storages = {}

    def find_class(self, module, name):
        if module == 'torch._utils' and name in REBUILDERS:
            # a fresh wrapper per lookup: functions have settable attributes
            return functools.partial(REBUILDERS[name])
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(
                f"refused global '{module}.{name}' in the pickle: a tensor checkpoint needs only "
                f"torch tensor/storage rebuilders and OrderedDict, and nothing from the file is "
                f"ever executed") from None

    def persistent_load(self, pid):
        """Resolves ``('storage', StorageType, key, location, numel[, view])`` to a StorageRef."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage'
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str) and _is_index(pid[4])):
            raise CheckpointError(f'unsupported persistent id {pid!r}')
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointError('storage views of the pre-1.0 legacy format are not supported; '
                                  're-save the checkpoint with a recent torch.save')
        ref = StorageRef(pid[2], pid[1].dtype, pid[4])
        if self.storages.setdefault(ref.key, ref) != ref:
            raise CheckpointError(f'storage {ref.key} is used with two dtypes or sizes')
        return ref


def itemsize(dtype):
    """Bytes per stored element of a ``STORAGE_DTYPES`` / ``SAFETENSORS_DTYPES`` value."""
    return 2 if dtype == BFLOAT16 else np.dtype(dtype).itemsize


def decode_elements(raw, dtype, byteorder='little'):
    """Raw bytes -> 1-D native-order array of ``dtype`` (bfloat16 widened to float32)."""
    order = '<' if byteorder == 'little' else '>'
    if dtype == BFLOAT16:
        # bfloat16 is the high half of a float32: shifting the 16 bits up is exact
        return (np.frombuffer(raw, order + 'u2').astype(np.uint32) << 16).view(np.float32)
    array = np.frombuffer(raw, order + dtype)
    return array.astype(array.dtype.newbyteorder('='), copy=False)


def tensor_to_numpy(record, storages, where):
    """A C-contiguous copy of the view ``record`` describes; ``where`` names it in errors."""
    elements = storages[record.storage.key]
    if 0 in record.size:
        return np.zeros(record.size, elements.dtype)
    last = record.offset + sum((n - 1) * s for n, s in zip(record.size, record.stride))
    if last >= elements.size:
        raise CheckpointError(f'{where}: tensor of size {list(record.size)} reads past the end '
                              f'of its storage ({elements.size} elements)')
    view = np.lib.stride_tricks.as_strided(
        elements[record.offset:], shape=record.size,
        strides=[s * elements.itemsize for s in record.stride], writeable=False)
    return view.copy()


def map_nested(obj, convert, is_leaf=lambda x: False):
    """``obj`` with every value inside its nested dicts, lists and tuples replaced by
    ``convert(value, where)`` (``where``: its path, e.g. ``model.head.weight``, for errors);
    ``is_leaf`` marks tuples to convert whole. What ``obj`` shares (one object referred to twice,
    as a pickle may) is converted once and shared in the result. Raises ``CheckpointError`` for
    containers nested deeper than ``MAX_DEPTH`` or holding themselves."""
    in_progress = object()
    built = {}  # id of a container or converted value -> what it became

    def build(x, where, depth):
        if id(x) in built:
            if built[id(x)] is in_progress:
                raise CheckpointError(f'{where}: a container holds itself')
            return built[id(x)]
        if depth > MAX_DEPTH:
            raise CheckpointError(f'{where}: containers nested more than {MAX_DEPTH} deep')
        built[id(x)] = in_progress
        if isinstance(x, dict):
            result = type(x)((k, build(v, f'{where}.{k}' if where else str(k), depth + 1)) for k, v in x.items())
        elif type(x) in (list, tuple) and not is_leaf(x):
            result = type(x)(build(v, f'{where}[{i}]', depth + 1) for i, v in enumerate(x))
        else:
            result = convert(x, where)
        built[id(x)] = result
        return result

    return build(obj, '', 0)


def materialize(obj, storages):
    """``obj`` with every TensorRecord in nested dicts, lists and tuples turned into an array
    (``map_nested``: shared records are built once).

    ``storages`` maps storage keys to their elements (1-D arrays). Raises ``CheckpointError``
    for a tensor with more elements than both its storage and ``MAX_EXPANDED``, and once the
    tensors together hold more than ``MAX_OVERLAP`` times the elements of the storages plus
    ``MAX_EXPANDED``.
    """
    total = sum(elements.size for elements in storages.values())
    budget = MAX_OVERLAP * total + MAX_EXPANDED

    def to_array(x, where):
        nonlocal budget
        if not isinstance(x, TensorRecord):
            return x
        numel, available = math.prod(x.size), storages[x.storage.key].size
        if numel > max(available, MAX_EXPANDED):
            raise CheckpointError(f'{where}: tensor of size {list(x.size)} has more elements than its '
                                  f'storage ({available}) and than an expanded view may ({MAX_EXPANDED})')
        budget -= numel
        if budget < 0:
            raise CheckpointError(f'{where}: the tensors hold more than {MAX_OVERLAP} times the {total} '
                                  f'elements of the storages plus {MAX_EXPANDED} (the same data viewed '
                                  f'over and over)')
        return tensor_to_numpy(x, storages, where)
    return map_nested(obj, to_array, is_leaf=lambda x: isinstance(x, TensorRecord))


def _uncompressed(archive, name):
    """The ``ZipInfo`` of entry ``name``, which must be stored uncompressed, so that reading it
    takes no more memory than the file does (a compressed entry can inflate a thousandfold)."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f'{name} is compressed, which torch.save never does; re-save the checkpoint '
                              f'with torch.save')
    return info


def _read_torch_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = sorted((n for n in names if n.rsplit('/', 1)[-1] == 'data.pkl'), key=len)
        if not pickles:
            raise CheckpointError('zip archive without data.pkl: not a torch.save checkpoint')
        prefix = pickles[0][:-len('data.pkl')]
        byteorder = 'little'
        if prefix + 'byteorder' in names:
            with archive.open(prefix + 'byteorder') as f:
                byteorder = f.read(16).decode('ascii', 'replace').strip()
        if byteorder not in ('little', 'big'):
            raise CheckpointError(f'byteorder record {byteorder!r} is neither little nor big')
        unpickler = RestrictedUnpickler(io.BytesIO(archive.read(_uncompressed(archive, pickles[0]))))
        obj = unpickler.load()
        storages = {}
        for key, ref in unpickler.storages.items():
            entry = f'{prefix}data/{key}'
            if entry not in names:
                raise CheckpointError(f'storage file {entry} is missing from the archive')
            size, stored = ref.numel * itemsize(ref.dtype), _uncompressed(archive, entry).file_size
            if stored != size:  # checked before inflating anything
                raise CheckpointError(f'storage file {entry} holds {stored} bytes, not the {size} of its '
                                      f'{ref.numel} elements')
            storages[key] = decode_elements(archive.read(entry), ref.dtype, byteorder)
    return materialize(obj, storages)


def _read_torch_legacy(path):
    with open(path, 'rb') as f:
        RestrictedUnpickler(f).load()  # the magic number (checkpoint_kind)
        if RestrictedUnpickler(f).load() != LEGACY_PROTOCOL:
            raise CheckpointError('unsupported legacy torch.save protocol; re-save the '
                                  'checkpoint with a recent torch.save (zip format)')
        # sys_info, whose little_endian describes the saving host: torch writes the storages
        # little-endian on any host, and torch.load reads them so
        RestrictedUnpickler(f).load()
        unpickler = RestrictedUnpickler(f)
        obj = unpickler.load()
        storages = {}
        for key in RestrictedUnpickler(f).load():
            ref = unpickler.storages[key]
            numel, = struct.unpack('<q', f.read(8))
            if numel != ref.numel:
                raise CheckpointError(f'storage {key} has {numel} elements where the pickle says {ref.numel}')
            size = numel * itemsize(ref.dtype)
            if size > os.fstat(f.fileno()).st_size - f.tell():
                raise CheckpointError('file ends inside a storage: truncated')
            storages[key] = decode_elements(f.read(size), ref.dtype)
    return materialize(obj, storages)


def _read_safetensors(path):
    with open(path, 'rb') as f:
        data = f.read()
    header_len, = struct.unpack('<Q', data[:8])
    if 8 + header_len > len(data):
        raise CheckpointError('file ends inside the safetensors header: truncated')
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f'corrupt safetensors header: {e}') from None
    body = memoryview(data)[8 + header_len:]
    arrays = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info['dtype']]
            shape = tuple(info['shape'])
            begin, end = info['data_offsets']
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f'{name}: unsupported or malformed safetensors entry {info!r}') from None
        if not (0 <= begin <= end <= len(body)) or end - begin != int(np.prod(shape)) * itemsize(dtype):
            raise CheckpointError(f'{name}: data offsets {[begin, end]} do not fit shape '
                                  f'{list(shape)} and the file (truncated?)')
        arrays[name] = decode_elements(body[begin:end], dtype).reshape(shape).copy()
    return arrays


TORCH_MAGIC_PICKLE = b'\x8a\x0a' + LEGACY_MAGIC.to_bytes(10, 'little')  # LONG1 opcode: torch.save's first pickle


def checkpoint_kind(path):
    """Returns 'zip', 'safetensors', 'legacy' (a legacy torch.save file), 'pickle' (another
    pickle, e.g. a Paddle .pdparams) or None from the first bytes of the file."""
    with open(path, 'rb') as f:
        head = f.read(32)
    if head[:4] == b'PK\x03\x04':
        return 'zip'
    if len(head) >= 9 and head[8:9] == b'{' and struct.unpack('<Q', head[:8])[0] <= MAX_SAFETENSORS_HEADER:
        return 'safetensors'
    if head[:1] == b'\x80':  # pickle protocol 2+; from protocol 4 a frame header precedes the first opcode
        first = head[11:] if head[2:3] == b'\x95' else head[2:]
        return 'legacy' if first.startswith(TORCH_MAGIC_PICKLE) else 'pickle'
    return None


def check_checkpoint_file(path, setting=None):
    """Raises ``CheckpointError`` unless ``path`` is a file, naming a folder as such; ``setting`` (the
    flag or key that gave ``path``) starts the message."""
    where = f'{setting}: ' if setting else ''
    if os.path.isdir(path):
        raise CheckpointError(f'{where}{path} is a folder, not a checkpoint file')
    if not os.path.isfile(path):
        raise CheckpointError(f'{where}checkpoint not found: {path}')


def read_checkpoint(path):
    """Reads a checkpoint file; returns its object tree with numpy arrays for tensors.

    torch files give what ``torch.load`` would (dicts, lists, numbers; ``argparse.Namespace``
    as ``types.SimpleNamespace``), safetensors files a flat dict name -> array.
    Raises ``CheckpointError`` naming ``path`` when the file is missing, corrupt, truncated,
    of an unknown kind, asks the pickle for anything beyond tensors, or would take far more
    memory than its storages (see ``materialize``).
    """
    check_checkpoint_file(path)
    try:
        kind = checkpoint_kind(path)
    except OSError as e:
        raise CheckpointError(f'{path}: cannot read: {e.strerror or e}') from None
    readers = {'zip': _read_torch_zip, 'legacy': _read_torch_legacy, 'safetensors': _read_safetensors}
    if kind is None:
        raise CheckpointError(f'{path}: not a checkpoint (expected a torch.save .pth/.pt/.bin '
                              f'file or a .safetensors file)')
    if kind == 'pickle':
        raise CheckpointError(f'{path}: a pickle, but not one written by torch.save; a Paddle .pdparams (a '
                              f'converted file or a training checkpoint) needs no conversion: use it as it is')
    try:
        return readers[kind](path)
    except CheckpointError as e:
        raise CheckpointError(f'{path}: {e}') from None
    except MemoryError as e:
        raise CheckpointError(f'{path}: not enough memory to read this {kind} file ({e})') from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError) as e:
        # RuntimeError: encrypted zip entries; NotImplementedError (a RuntimeError): unknown zip
        # compression methods, versions and flags
        raise CheckpointError(f'{path}: corrupt, truncated or unsupported {kind} file '
                              f'({type(e).__name__}: {e})') from None
    except (pickle.UnpicklingError, AttributeError, IndexError, KeyError, TypeError,
            ValueError, OverflowError, struct.error) as e:
        raise CheckpointError(f'{path}: corrupt {kind} checkpoint ({type(e).__name__}: {e})') from None

"""Reading PyTorch weight files without torch and without running pickled code.

    from mmjax.interop.torch_files import load_state_dict
    arrays = load_state_dict("open_clip_model.safetensors")   # or a torch.save(...) .pt / .bin file
    # -> dict[str, np.ndarray], e.g. {'visual.conv1.weight': float32 [768,3,32,32], ...}

`.safetensors`: the header (8-byte little-endian length, then JSON) is parsed here; no package is needed.
`.pt` / `.bin`: torch's zip format (torch >= 1.6, the default of `torch.save`). Its `data.pkl` is read by a
restricted `pickle.Unpickler` whose `find_class` resolves only the handful of globals a state dict needs
(`torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`, `torch.<Dtype>Storage`,
`collections.OrderedDict`) to numpy builders that read the storages from the zip. Any other global (a
`__reduce__` payload such as `posix.system`, or the classes of a whole pickled `nn.Module`) raises
`UnsafeCheckpointError` before anything is called. Plain (non-zip) pickles are refused the same way.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from mmjax.errors import MmjaxError

try:  # bfloat16 / float8 numpy dtypes (ml_dtypes is a dependency of jax)
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None


class UnsafeCheckpointError(MmjaxError, ValueError):
    """The file needs code execution (a global outside the state-dict allowlist) to be loaded."""


class CheckpointFileError(MmjaxError, ValueError):
    """A weight file that is damaged or not a flat state dict; the message names the file."""


class CheckpointFileNotFoundError(CheckpointFileError, FileNotFoundError):
    """The weight file does not exist."""


RESAVE_HINT = ("If this file holds a whole pickled model (torch.save(model, ...)), re-save its weights as a "
               "state dict: torch.save(model.state_dict(), 'weights.pt') or "
               "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors').")


def _np_dtype(name: str) -> np.dtype:
    if name in ('bfloat16', 'float8_e4m3fn', 'float8_e5m2'):
        if ml_dtypes is None:
            raise CheckpointFileError(f'reading {name} tensors needs the ml_dtypes package')
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


# torch storage class name -> numpy dtype name.
_STORAGE_DTYPES = {
    'DoubleStorage': 'float64', 'FloatStorage': 'float32', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32', 'ShortStorage': 'int16',
    'CharStorage': 'int8', 'ByteStorage': 'uint8', 'BoolStorage': 'bool',
    'ComplexFloatStorage': 'complex64', 'ComplexDoubleStorage': 'complex128',
}

# safetensors dtype tag -> numpy dtype name.
_SAFETENSORS_DTYPES = {
    'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16', 'I64': 'int64', 'I32': 'int32',
    'I16': 'int16', 'I8': 'int8', 'U64': 'uint64', 'U32': 'uint32', 'U16': 'uint16', 'U8': 'uint8',
    'BOOL': 'bool', 'F8_E4M3': 'float8_e4m3fn', 'F8_E5M2': 'float8_e5m2',
}


# ----------------------------------------------------------------------------------------------- safetensors

def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """A `.safetensors` file -> {name: array} (copies, native byte order). Raises ValueError on a bad file."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointFileError(f'{path}: not a safetensors file (shorter than its 8-byte header length)')
        (n,) = struct.unpack('<Q', head)
        if n > size - 8:
            raise CheckpointFileError(f'{path}: not a safetensors file (header length {n} exceeds the file size '
                                      f'{size})')
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFileError(f'{path}: not a safetensors file (header is not JSON: {e})') from e
    if not isinstance(header, dict):
        raise CheckpointFileError(f'{path}: safetensors header is not a JSON object')
    data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        try:
            dtype = _np_dtype(_SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
            shape = tuple(int(d) for d in info['shape'])
            begin, end = (int(o) for o in info['data_offsets'])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFileError(f'{path}: tensor {name!r} has a bad header entry {info!r}') from e
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= data.size or end - begin != nbytes:
            raise CheckpointFileError(f'{path}: tensor {name!r} offsets [{begin}, {end}) do not hold {shape} '
                                      f'{dtype.name} in a data section of {data.size} bytes')
        out[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder('='))
    return out


# ------------------------------------------------------------------------------------------- torch zip files

class _StorageType:
    """Stands for `torch.<X>Storage` in a pickle: only its dtype is used."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _np_dtype(_STORAGE_DTYPES[name])


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2`: a (contiguous copy of a) strided view into a flat storage."""
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointFileError('malformed checkpoint: a tensor is built from something that is not a storage')
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise CheckpointFileError(f'malformed checkpoint: tensor size {size} / stride {stride} / offset {offset}')
    if math.prod(size) == 0:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointFileError(f'malformed checkpoint: tensor {size} (stride {stride}, offset {offset}) reads past '
                                  f'its storage of {storage.size} elements')
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * storage.itemsize for s in stride),
                                           writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *state):
    """`torch._utils._rebuild_parameter(_with_state)`: a Parameter is just its data here."""
    del requires_grad, backward_hooks, state
    return data


# (module, name) -> the stand-in it resolves to. Nothing else can be named by the pickle.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): _ordered_dict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    **{('torch', name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch `data.pkl`, resolving only `_ALLOWED_GLOBALS`; storages come from `read_storage`."""

    def __init__(self, data: bytes, read_storage, source: str):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage
        self._source = source
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key not in _ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(
                f'{self._source}: `{module}.{name}` is not allowed in a checkpoint: only tensors, parameters and '
                f'(ordered) dicts are read, because loading anything else would execute code from the file. '
                f'{RESAVE_HINT}')
        return _ALLOWED_GLOBALS[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f'{self._source}: unexpected persistent id {pid!r} (not a torch storage)')
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, int(numel))
        return self._storages[key]


def load_torch_zip(path: str) -> Any:
    """Unpickles a torch zip checkpoint with tensors as numpy arrays (the raw object: usually a dict)."""
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(
            f'{path}: not a torch zip checkpoint (a legacy torch file or a plain pickle); such files can only be '
            f'read by executing them. Re-save it with torch >= 1.6 (torch.save(state_dict, path)) or as '
            f'safetensors. {RESAVE_HINT}')
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
        if len(pkls) != 1:
            raise CheckpointFileError(f'{path}: not a torch checkpoint (expected one <name>/data.pkl, found {pkls})')
        root = pkls[0][: -len('data.pkl')]
        order = zf.read(root + 'byteorder').decode().strip() if root + 'byteorder' in names else 'little'
        if order not in ('little', 'big'):
            raise CheckpointFileError(f'{path}: unknown byteorder {order!r}')

        def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            member = f'{root}data/{key}'
            if member not in names:
                raise CheckpointFileError(f'{path}: storage {key!r} is missing from the archive')
            raw = zf.read(member)
            want = numel * dtype.itemsize
            if len(raw) < want:
                raise CheckpointFileError(f'{path}: storage {key!r} has {len(raw)} bytes, expected {want}')
            arr = np.frombuffer(raw[:want], dtype.newbyteorder('<' if order == 'little' else '>'))
            return arr.astype(dtype.newbyteorder('='))

        return _StateDictUnpickler(zf.read(pkls[0]), read_storage, path).load()


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torch zip checkpoint -> {name: array}. A training checkpoint's 'state_dict' entry is used when present
    and a DataParallel 'module.' prefix is removed."""
    obj = load_torch_zip(path)
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict):
        raise CheckpointFileError(f'{path}: holds a {type(obj).__name__}, not a state dict. {RESAVE_HINT}')
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointFileError(f'{path}: entries {bad[:5]} (of {len(bad)}) are not tensors; expected a flat state '
                                  f'dict')
    if obj and all(k.startswith('module.') for k in obj):
        obj = {k[len('module.'):]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """`.safetensors` or a torch zip checkpoint (`.pt`, `.pth`, `.bin`) -> {name: np.ndarray}, no torch needed."""
    if not os.path.isfile(path):
        raise CheckpointFileNotFoundError(f'checkpoint {path!r} does not exist; pass a .safetensors or a torch '
                                          f'.pt/.bin file to --checkpoint')
    if path.endswith('.safetensors'):
        return load_safetensors(path)
    return load_torch_state_dict(path)

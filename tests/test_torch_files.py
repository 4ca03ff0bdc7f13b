"""Reading torch weight files without torch and without running pickled code (mmjax.interop.torch_files)."""

import collections
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from mmjax.interop.torch_files import UnsafeCheckpointError, load_safetensors, load_state_dict


def _safetensors_bytes(arrays: dict, tags: dict) -> bytes:
    header, blobs, offset = {"__metadata__": {"format": "np"}}, [], 0
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": tags[name], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def test_safetensors_hand_written_file(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(3, 4)).astype(np.float32), "i": np.arange(6, dtype=np.int64).reshape(2, 3),
              "h": rng.normal(size=(5,)).astype(np.float16), "s": np.asarray(1.5, np.float64)}
    path = tmp_path / "a.safetensors"
    path.write_bytes(_safetensors_bytes(arrays, {"w": "F32", "i": "I64", "h": "F16", "s": "F64"}))
    got = load_state_dict(str(path))
    assert sorted(got) == sorted(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape and np.array_equal(got[k], a)


def test_safetensors_bad_offsets_are_refused(tmp_path):
    a = np.zeros((2, 2), np.float32)
    data = bytearray(_safetensors_bytes({"w": a}, {"w": "F32"}))
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bytes(data[:-4]))  # truncated data section
    with pytest.raises(ValueError, match="tensor 'w' offsets"):
        load_safetensors(str(path))
    path.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ValueError, match="header length"):
        load_safetensors(str(path))


def test_safetensors_written_by_the_package_round_trips(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="needs the safetensors package")
    rng = np.random.default_rng(1)
    arrays = {"a.weight": rng.normal(size=(7, 3)).astype(np.float32), "b": rng.integers(0, 9, (4,)).astype(np.int32),
              "c": rng.normal(size=(2, 2, 2)).astype(np.float16), "flag": np.array([True, False])}
    st.save_file(arrays, str(tmp_path / "m.safetensors"))
    got = load_state_dict(str(tmp_path / "m.safetensors"))
    assert sorted(got) == sorted(arrays) and all(np.array_equal(got[k], v) for k, v in arrays.items())


def test_torch_pt_round_trip_equals_numpy(tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch to write .pt files")
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    sd = collections.OrderedDict(
        w=torch.randn(3, 4), transposed=torch.randn(4, 3).t(), sliced=base[1:4, ::2], view_of_w=None,
        i64=torch.arange(7), i8=torch.tensor([-3, 4], dtype=torch.int8), half=torch.randn(3).half(),
        bf16=torch.randn(2, 3).bfloat16(), boolean=torch.tensor([True, False]), scalar=torch.tensor(2.5),
        param=torch.nn.Parameter(torch.randn(2, 2)), empty=torch.zeros(0, 3))
    sd["view_of_w"] = sd["w"][1]  # shares w's storage
    path = str(tmp_path / "sd.pt")
    torch.save(sd, path)
    got = load_state_dict(path)
    assert list(got) == list(sd)
    for k, t in sd.items():
        want = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
        assert got[k].shape == want.shape, k
        assert np.array_equal(got[k].astype(want.dtype), want), k
    assert got["bf16"].dtype.name == "bfloat16"


def test_training_checkpoint_state_dict_and_module_prefix(tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch to write .pt files")
    w = torch.randn(2, 3)
    path = str(tmp_path / "epoch_1.pt")
    torch.save({"epoch": 1, "name": "run", "state_dict": {"module.a.weight": w, "module.logit_scale": torch.ones(())}},
               path)
    got = load_state_dict(path)
    assert sorted(got) == ["a.weight", "logit_scale"] and np.array_equal(got["a.weight"], w.numpy())


class _Payload:
    """Unpickling this runs `func(*args)`: what a malicious checkpoint does."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _torch_zip(path: str, pickled: bytes, storages: dict | None = None) -> None:
    """A file in torch's zip layout (archive/data.pkl, archive/byteorder, archive/data/<key>)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)


@pytest.mark.parametrize("func_name", ["system", "popen", "eval"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, func_name):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    func = {"system": os.system, "popen": os.popen, "eval": eval}[func_name]
    arg = f"open({str(marker)!r}, 'w').close()" if func_name == "eval" else command
    payload = pickle.dumps({"w": _Payload(func, (arg,))}, protocol=2)

    zipped = str(tmp_path / "evil.pt")
    _torch_zip(zipped, payload)
    with pytest.raises(UnsafeCheckpointError, match=rf"`(posix|os|builtins|__builtin__)\.{func_name}` is not allowed"):
        load_state_dict(zipped)

    plain = tmp_path / "evil.bin"
    plain.write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match="not a torch zip checkpoint"):
        load_state_dict(str(plain))
    assert not marker.exists()

    # control: the payload is live (plain pickle runs it and creates the marker)
    result = pickle.loads(payload)["w"]
    if func_name == "popen":
        result.close()  # waits for the shell
    assert marker.exists()


def test_payload_hidden_inside_a_real_torch_file(tmp_path):
    """A genuine torch.save archive (storages, byteorder, version) whose data.pkl is swapped for a payload."""
    torch = pytest.importorskip("torch", reason="needs torch to write .pt files")
    marker = tmp_path / "pwned"
    good = str(tmp_path / "good.pt")
    torch.save({"w": torch.ones(2)}, good)
    with zipfile.ZipFile(good) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps({"w": _Payload(os.system, (f"touch {marker}",))}, protocol=2)
    evil = str(tmp_path / "evil.pt")
    with zipfile.ZipFile(evil, "w") as zf:
        for n, raw in members.items():
            zf.writestr(n, raw)
    with pytest.raises(UnsafeCheckpointError, match=r"`posix\.system` is not allowed"):
        load_state_dict(evil)
    assert not marker.exists()
    assert np.array_equal(load_state_dict(good)["w"], np.ones(2, np.float32))


def test_pickled_module_is_refused_with_resave_hint(tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch to pickle a module")
    path = str(tmp_path / "model.pt")
    torch.save(torch.nn.Linear(3, 2), path)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert "torch.nn.modules.linear.Linear" in msg and "model.state_dict()" in msg and "safetensors" in msg


def test_out_of_bounds_tensor_view_is_refused(tmp_path):
    """A crafted tensor whose size/stride reach past its storage is an error, not a read of other memory."""
    buf = io.BytesIO()

    class _Storage:
        def __init__(self, pid):
            self.pid = pid

    class _P(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, _Storage) else None

    # stand-ins named like torch's globals, so the stream references `torch._utils._rebuild_tensor_v2`
    fake_torch = types.ModuleType("torch")
    fake_utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # pragma: no cover - only pickled by reference
        raise AssertionError

    class FloatStorage:  # pragma: no cover
        pass

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    fake_utils._rebuild_tensor_v2, fake_torch.FloatStorage = _rebuild_tensor_v2, FloatStorage

    class _Tensor:
        def __reduce__(self):
            storage = _Storage(("storage", FloatStorage, "0", "cpu", 2))
            return _rebuild_tensor_v2, (storage, 0, (16,), (1,), False, collections.OrderedDict())

    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = fake_torch, fake_utils
    try:
        _P(buf, protocol=2).dump({"w": _Tensor()})
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    path = str(tmp_path / "oob.pt")
    _torch_zip(path, buf.getvalue(), {"0": np.zeros(2, np.float32).tobytes()})
    with pytest.raises(ValueError, match="reads past its storage of 2 elements"):
        load_state_dict(path)


def test_no_other_module_unpickles():
    """Only mmjax/interop/torch_files.py (its restricted unpickler) touches pickle; nothing calls torch.load or
    np.load with allow_pickle."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent / "mmjax"
    risky = re.compile(r"\bpickle\b|\bdill\b|cloudpickle|torch\.load|allow_pickle\s*=\s*True|joblib\.load")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "torch_files.py" and risky.search(p.read_text())]
    assert offenders == []

"""The package's shape stays as designed: layers only look down (import-linter), one lint rule set (ruff),
small modules and functions, no task branching outside mmjax/tasks, no imports hidden inside functions."""

import ast
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mmjax"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# Optional or heavy third-party packages that may be imported inside a function (with a comment saying why).
LAZY_OK = ("matplotlib", "tensorboardX", "sentencepiece", "tokenizers", "torch", "open_clip", "librosa",
           "sklearn", "tensorflow_datasets", "scipy", "ml_dtypes", "orbax.checkpoint._src", "tqdm", "safetensors",
           "libtpu", "google.cloud", "boto3")


# The one import of mmjax's own placed inside a function: `mmjax.load` imports the inference stack on first use, so
# `from mmjax.config import base_config` (every config file, grain's worker processes) does not import JAX,
# Orbax and the models.
OWN_LAZY_OK = {("mmjax/__init__.py", "mmjax.inference")}


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `pip install -e '.[test]'` installs it")
    return path


def test_import_layers_hold():
    r = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_ruff_passes():
    r = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_are_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} is over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, (f"{path.relative_to(ROOT)}:{node.lineno} {node.name} is "
                                                  f"{length} lines (at most {MAX_FUNCTION_LINES})")


def test_only_tasks_branch_on_the_task():
    offenders = []
    for path in _modules():
        if path.parent.name == "tasks":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"config\.task\s*[!=]=|\.get\(['\"]task['\"]", line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "branching on config.task outside mmjax/tasks:\n" + "\n".join(offenders)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_inside_functions_are_only_optional_dependencies(path):
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                names = [inner.module] if isinstance(inner, ast.ImportFrom) else [a.name for a in inner.names]
                where = f"{path.relative_to(ROOT)}:{inner.lineno}"
                for name in names:
                    if (str(path.relative_to(ROOT)), name) in OWN_LAZY_OK:
                        continue
                    assert not name.startswith("mmjax"), f"{where}: mmjax's own {name} imported inside a function"
                    assert any(name == k or name.startswith(k + ".") for k in LAZY_OK), (  # noqa: B023
                        f"{where}: {name} imported inside a function; import it at the top (only optional heavy "
                        f"dependencies may be imported lazily)")
                context = " ".join(lines[inner.lineno - 2:inner.end_lineno + 1])
                assert "#" in context, f"{where}: a lazy import of {names} needs a comment saying why"


# Direct file access (builtin open, os.path checks, os.makedirs/listdir/remove/replace, glob, shutil) is allowed only
# where the path can never be a URL; everything else goes through the path layer mmjax/storage.py (issue 21: no
# local folder named `gs:` ever again). Each exception says why: a module in LOCAL_ONLY, or a `# local` comment on
# the line (a path checked to be local first, a temporary file, an import of a config file).
LOCAL_ONLY = {
    "mmjax/storage.py": "the path layer itself: its local branches",
    "mmjax/training/lock_stores.py": "LocalLockStore: a lock file on a local or network disk (flock, hard links)",
    "mmjax/training/lock.py": "/proc (process start times, boot id)",
    "mmjax/runtime/cpu.py": "/sys (transparent huge pages)",
    "mmjax/runtime/flops.py": "/proc/cpuinfo and the per-machine CPU-peak cache in ~/.cache",
    "mmjax/interop/open_clip.py": "open_clip's installed package folder (its built-in configs and BPE file)",
    "mmjax/interop/torch_files.py": "the torch checkpoint being converted, memory-mapped from a local file",
}
_FILE_CALLS = re.compile(r"^(open|os\.(makedirs|mkdir|listdir|scandir|remove|unlink|replace|rename|stat)|"
                         r"os\.path\.(exists|isdir|isfile|getsize)|glob\.glob|shutil\.(copy\w*|move|rmtree))$")


def _call_name(node):
    parts, func = [], node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_files_are_reached_through_the_path_layer():
    offenders = []
    for path in _modules():
        rel = str(path.relative_to(ROOT))
        if rel in LOCAL_ONLY:
            continue
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and _FILE_CALLS.match(_call_name(node)) and \
                    "# local" not in lines[node.lineno - 1]:
                offenders.append(f"{rel}:{node.lineno}: {_call_name(node)}(...)")
    assert not offenders, ("direct file access where a path may be a gs:// or s3:// URL; use mmjax.storage (or add "
                           "the module to LOCAL_ONLY with the reason its paths are always local):\n"
                           + "\n".join(offenders))

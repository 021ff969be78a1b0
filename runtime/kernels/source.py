"""Where the runtime finds generated kernel source, and how it imports it.

The runtime never generates source itself (that is the compiler's job) and never imports the compiler.
It looks for `<digest>.py` (the digest of the kernel key) in, in order:
1. the directories registered with `add_kernel_dir` (`nestc_runtime.load(DIR)` registers `DIR/kernels`,
   which `nestc compile -o DIR` fills);
2. the cache directory (`$NESTC_KERNEL_CACHE`, default `~/.cache/nestc/kernels`), where source obtained from
   a generator is written.
When a generator is installed it is asked first and its source replaces a stale cached file (the digest
names the key, not the compiler version).
A generator is any callable key text -> source, installed with `use_generator` by whoever can generate
(the compiler's `nestc.codegen.install()`, which `nestc.compile` and the command line call).
The file is imported from disk (not exec'd from a string) because Triton reads a kernel's source with
`inspect.getsource`; its KEY constant must equal the key asked for.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ..errors import RuntimeInputError
from .key import KernelKey

Generator = Callable[[str], str]

_kernel_dirs: list[Path] = []
_generator: Generator | None = None
_modules: dict[str, ModuleType] = {}
_lock = threading.Lock()


def add_kernel_dir(directory: str | Path) -> None:
    """Search `directory` for generated kernels (first registered, first searched)."""
    path = Path(directory)
    if path not in _kernel_dirs:
        _kernel_dirs.append(path)


def use_generator(generator: Generator | None) -> None:
    """Install (or with None remove) the callable that renders source for a key text."""
    global _generator
    _generator = generator


def has_generator() -> bool:
    return _generator is not None


def cache_dir() -> Path:
    return Path(os.environ.get("NESTC_KERNEL_CACHE") or Path.home() / ".cache" / "nestc" / "kernels")


def _find(key: KernelKey) -> Path | None:
    name = f"{key.digest()}.py"
    for directory in [*_kernel_dirs, cache_dir()]:
        if (directory / name).is_file():
            return directory / name
    return None


def available(key: KernelKey) -> bool:
    """Whether a key's source can be had: already imported, on disk, or from an installed generator."""
    return key.text() in _modules or _generator is not None or _find(key) is not None


def _generate(key: KernelKey) -> Path:
    if _generator is None:
        raise RuntimeInputError(
            f"no generated kernel for `{key.text()}`",
            hint="compile the spec with `nestc compile SPEC -o DIR` and load DIR, or call nestc.codegen.install()",
        )
    path = cache_dir() / f"{key.digest()}.py"
    text = _generator(key.text())
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def kernel_module(key: KernelKey) -> ModuleType:
    """The imported module of a key's generated kernels (imported once per process)."""
    text = key.text()
    with _lock:
        if text in _modules:
            return _modules[text]
        # With a generator installed (the compiler in this process) its source is the truth: a cached file
        # from another compiler version is rewritten. Without one, the files on disk are all there is.
        path = _generate(key) if _generator is not None else _find(key)
        if path is None:
            path = _generate(key)  # raises the "no generated kernel" error
        module = _import(path, f"nestc_kernels.{key.digest()}")
        if getattr(module, "KEY", None) != text:
            raise RuntimeInputError(f"{path}: holds the kernel `{getattr(module, 'KEY', '?')}`, not `{text}`")
        _modules[text] = module
        return module


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeInputError(f"{path}: cannot import generated kernel source")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect.getsource finds the file through the module
    spec.loader.exec_module(module)
    return module

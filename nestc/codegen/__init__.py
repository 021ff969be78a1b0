"""Code generation: Triton source specialised per level, from the level's kernel key (DESIGN §7).

`render_matrix(key)` renders a key's module (cached by key); `install()` lets the runtime ask for source
it cannot find on disk; `write_level_kernels` writes a compiled system's kernels and their line maps.
"""

from __future__ import annotations

from nestc_runtime.kernels.key import MatrixKernelKey, MLPKernelKey, parse_key

from .emit import write_level_kernels
from .render import GeneratedKernel, Section, render_matrix, render_mlp


def render(key: MatrixKernelKey | MLPKernelKey) -> GeneratedKernel:
    return render_mlp(key) if isinstance(key, MLPKernelKey) else render_matrix(key)


def source_for(key_text: str) -> str:
    """The generated source of a key given as text (what the runtime's generator hook is called with)."""
    return render(parse_key(key_text)).source


def install() -> None:
    """Make the runtime generate missing kernels with this compiler (in-process use)."""
    from nestc_runtime.kernels.source import use_generator

    use_generator(source_for)


__all__ = [
    "GeneratedKernel",
    "MatrixKernelKey",
    "Section",
    "install",
    "render_matrix",
    "source_for",
    "write_level_kernels",
]

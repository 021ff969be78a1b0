"""Generated Triton kernels at run time: their keys, where their source is found, their custom ops.

Nothing here imports Triton or the compiler at import time: the generated module (which imports Triton)
is loaded on the first launch, from a `nestc compile -o DIR` directory or from a generator installed by
the compiler (`nestc.codegen.install()`).
"""

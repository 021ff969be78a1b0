"""The key of a generated matrix-memory kernel: which combination of primitives and shapes it computes.

A key is the whole input of code generation: the compiler renders Triton source from it, the runtime
looks the source up by its digest. Its text form is a fixed sequence of validated words and numbers
(`matrix-l2-gd-after-online-c1-bt64-dk64-dv64-fp32`), so nothing but those words and numbers can reach
generated source, and the runtime can rebuild a key from a custom op's string argument.

Scope of the kernels (everything else runs on the chunked PyTorch path):
- objective `dot` or `l2`, optimizer `gd` or `momentum_gd` (decay after or before) or `dgd` (decay after);
- update every token (C = 1, the WY/UT within-block solve over blocks of `block` tokens) or every C
  tokens with C = block (one chunk per block: the linearisation point is the block's start state);
- retention (and momentum rate) per head or scalar, not per channel; reads online, before or boundary;
- head dims 16, 32, 64 or 128; float32 (tl.dot in IEEE fp32) or bfloat16 inputs (computed in fp32).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

OBJECTIVES = ("dot", "l2")
OPTIMIZERS = ("gd", "dgd", "momentum_gd")
DECAYS = ("after", "before")
READS = ("online", "before", "boundary")
DTYPES = ("fp32", "bf16")
HEAD_DIMS = (16, 32, 64, 128)
BLOCKS = (16, 32, 64)
TOKEN_BLOCK = 64  # the within-block solve's size at C = 1 (as flash-linear-attention's chunked delta rule)


@dataclass(frozen=True)
class MatrixKernelKey:
    """memory (matrix) × objective × optimizer × decay × read × chunk × block × head dims × dtype."""

    objective: str
    optimizer: str
    decay: str
    read: str
    chunk: int
    block: int
    d_key: int
    d_value: int
    dtype: str

    def __post_init__(self) -> None:
        _choice("objective", self.objective, OBJECTIVES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("decay", self.decay, DECAYS)
        _choice("read", self.read, READS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("block", self.block, BLOCKS)
        _choice("d_key", self.d_key, HEAD_DIMS)
        _choice("d_value", self.d_value, HEAD_DIMS)
        if self.optimizer == "dgd" and self.decay == "before":
            raise ValueError('decay "before" with optimizer "dgd" has no kernel (the DGD factor carries α)')
        if self.chunk not in (1, self.block):
            raise ValueError(f"chunk must be 1 or the block size {self.block}, got {self.chunk!r}")

    @property
    def per_token(self) -> bool:
        """C = 1: every token is its own chunk (the delta-rule family)."""
        return self.chunk == 1

    def text(self) -> str:
        return (
            f"matrix-{self.objective}-{self.optimizer}-{self.decay}-{self.read}-c{self.chunk}-bt{self.block}"
            f"-dk{self.d_key}-dv{self.d_value}-{self.dtype}"
        )

    def digest(self) -> str:
        """The file name stem of the generated source: a hash of the key's text."""
        return "k" + hashlib.sha256(self.text().encode()).hexdigest()[:16]

    @classmethod
    def parse(cls, text: str) -> MatrixKernelKey:
        """The key written by `text()`; anything else is a ValueError."""
        parts = text.split("-")
        if len(parts) != 10 or parts[0] != "matrix":
            raise ValueError(f"not a matrix kernel key: {text!r}")
        _, objective, optimizer, decay, read, chunk, block, dk, dv, dtype = parts
        return cls(
            objective=objective,
            optimizer=optimizer,
            decay=decay,
            read=read,
            chunk=_number(chunk, "c"),
            block=_number(block, "bt"),
            d_key=_number(dk, "dk"),
            d_value=_number(dv, "dv"),
            dtype=dtype,
        )


def block_for_chunk(chunk: int, width: int = 64) -> int | None:
    """The block a chunk size runs in: at C = 1 TOKEN_BLOCK, or 32 for head dims above 64 (shared memory,
    see `fits_sm90`); C itself when it is a kernel block size."""
    if chunk == 1:
        return TOKEN_BLOCK if width <= 64 else 32
    return chunk if chunk in BLOCKS else None


SM90_SHARED_BYTES = 232_448  # shared memory one block may use on sm_90 (H100, H200)


def fits_sm90(key: MatrixKernelKey | MLPKernelKey) -> bool:
    """Whether a key's forward and backward kernels fit in SM90_SHARED_BYTES (else the launch fails), by the
    sizes triton.compile reports for GPUTarget("cuda", 90, 32) with Triton 3.9 (bf16 keys, bytes; backward,
    the larger of the two): matrix gd at C = 1: block 64 head dim 64 147,456; block 64 dim 128 376,832 (no);
    block 32 dim 128 200,704. Matrix gd with C = block: 64 and dim 128 361,472 (no); 32 and dim 128 246,272
    (no). Matrix momentum_gd at C = 1, block 64, dim 64: 212,992. MLP at C = 16: d 64 hidden 256 389,376 (no);
    d 64 hidden 128 200,960; d 32 hidden 128 107,776. Unmeasured combinations past these are refused."""
    if isinstance(key, MLPKernelKey):
        return key.chunk * key.d * key.hidden <= 16 * 64 * 128
    if max(key.d_key, key.d_value) <= 64:
        return True
    return key.optimizer == "gd" and key.per_token and key.block <= 32


def _number(word: str, prefix: str) -> int:
    digits = word[len(prefix) :]
    if not word.startswith(prefix) or not digits.isdigit() or len(digits) > 4:
        raise ValueError(f"bad key field {word!r} (expected {prefix}<number>)")
    return int(digits)


def _choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise ValueError(f"kernel key: {name} must be one of {choices}, got {value!r}")


HIDDEN_DIMS = (16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class MLPKernelKey:
    """A 2-layer MLP memory M(x) = x + [LN](W1 σ(W2 x)), σ = SiLU, updated by `gd` with a per-head retention
    every C tokens (C = the block: 16, 32 or 64), objective `dot` or `l2`: memory × objective × optimizer ×
    read × chunk × d × hidden × norm × dtype."""

    objective: str
    read: str
    chunk: int
    d: int
    hidden: int
    norm: bool
    dtype: str

    def __post_init__(self) -> None:
        _choice("objective", self.objective, OBJECTIVES)
        _choice("read", self.read, READS)
        _choice("chunk", self.chunk, BLOCKS)
        _choice("d", self.d, HEAD_DIMS)
        _choice("hidden", self.hidden, HIDDEN_DIMS)
        _choice("norm", self.norm, (True, False))
        _choice("dtype", self.dtype, DTYPES)

    @property
    def block(self) -> int:
        return self.chunk

    def text(self) -> str:
        norm = "ln" if self.norm else "plain"
        return f"mlp-{self.objective}-gd-{self.read}-c{self.chunk}-d{self.d}-h{self.hidden}-{norm}-{self.dtype}"

    def digest(self) -> str:
        return "k" + hashlib.sha256(self.text().encode()).hexdigest()[:16]

    @classmethod
    def parse(cls, text: str) -> MLPKernelKey:
        parts = text.split("-")
        if len(parts) != 9 or parts[0] != "mlp" or parts[2] != "gd" or parts[7] not in ("ln", "plain"):
            raise ValueError(f"not an MLP kernel key: {text!r}")
        _, objective, _, read, chunk, d, hidden, norm, dtype = parts
        return cls(
            objective=objective,
            read=read,
            chunk=_number(chunk, "c"),
            d=_number(d, "d"),
            hidden=_number(hidden, "h"),
            norm=norm == "ln",
            dtype=dtype,
        )


KernelKey = MatrixKernelKey | MLPKernelKey


def parse_key(text: str) -> KernelKey:
    """A matrix or MLP kernel key from its text; anything else is a ValueError."""
    return MLPKernelKey.parse(text) if text.startswith("mlp-") else MatrixKernelKey.parse(text)

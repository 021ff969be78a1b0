"""Configuration and carried state of a `kv` memory level (causal softmax attention, DESIGN §5).

A `kv` memory is an in-context level that updates every token and has no parameters of its own: its
state, per batch row and head, is the cache of the keys and values seen so far in the document.
Optionally a `persistent` memory — P learned key/value pairs per head — is prepended to every cache:
always visible, never evicted, never reset (it is a parameter of a slower level, carried in the
state the way a matrix memory carries its θ_init).

Visibility (which cached token s a query at document position t attends to), with d = t − s:

    read "online":  0 ≤ d        (the current key/value already appended: state θ_t)
    read "before":  1 ≤ d        (state θ_{t−1}; an empty cache and no persistent memory read 0)
    window W:       d < W ("online"), d ≤ W ("before")  — the cache holds the last W tokens
                    including the current one, and a `before` read sees θ_{t−1}, i.e. t−W … t−1
    segment S:      ⌊s/S⌋ = ⌊t/S⌋  — MAC-style: the cache restarts at every multiple of S
                    counted from the document start (the first token of a segment reading
                    `before` sees only the persistent memory)

Layout of the carried cache (both implementations produce exactly this layout, so states compare
slot by slot): row b holds ``length[b]`` tokens left-aligned in slots 0 … length−1, oldest first,
contiguous in position and ending at the last consumed token, so slot j holds position
``position[b] − length[b] + j``.  Slots ≥ length are zero.  After token t the cache holds the tokens
an `online` read at t sees: those of t's segment with t − s < W.  (With a segment, a cache that
ended exactly at a segment end is cleared lazily when the next token arrives.)  The capacity
(slot count) may differ between implementations; ``trim()`` cuts it to the longest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

READS = ("online", "before")


@dataclass(frozen=True)
class AttentionConfig:
    """Static configuration of one `kv` memory level.

    read: "online" (attend over tokens ≤ t) or "before" (tokens < t).
    window: sliding-window size W ≥ 1 (the cache keeps the last W tokens) or None (whole document).
    segment: segment size S ≥ 1 (attention within segments of S tokens from the document start) or None.
    scale: score scale; None means 1/sqrt(d_k).
    """

    read: str = "online"
    window: int | None = None
    segment: int | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.read not in READS:
            raise ValueError(f"read must be one of {READS}, got {self.read!r}")
        for name in ("window", "segment"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")

    def score_scale(self, dk: int) -> float:
        return float(self.scale) if self.scale is not None else dk**-0.5

    @property
    def capacity(self) -> int | None:
        """Most tokens the cache ever holds between tokens (None: unbounded)."""
        bounds = [b for b in (self.window, self.segment) if b is not None]
        return min(bounds) if bounds else None


@dataclass
class AttentionState:
    """State carried between calls.

    keys: (B,H,N,dk) and values: (B,H,N,dv) cache slots (N = capacity, see the module docstring).
    length: (B,) int64 valid slots per row.
    position: (B,) int64 tokens consumed since the document start (the next token's position).
    persistent_keys: (H,P,dk), persistent_values: (H,P,dv) learned pairs (may require grad), or None.
    """

    keys: Tensor
    values: Tensor
    length: Tensor
    position: Tensor
    persistent_keys: Tensor | None = None
    persistent_values: Tensor | None = None

    @classmethod
    def initial(
        cls,
        batch: int,
        heads: int,
        dk: int,
        dv: int,
        persistent: tuple[Tensor, Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> AttentionState:
        """Start-of-document state: an empty cache at position 0 (persistent pairs as given)."""
        pk, pv = persistent if persistent is not None else (None, None)
        if pk is not None and pv is not None:
            if pk.dim() != 3 or pv.dim() != 3 or pk.shape[:2] != pv.shape[:2] or pk.shape[0] != heads:
                raise ValueError(f"persistent must be (H,P,dk), (H,P,dv) with H={heads}")
            if pk.shape[-1] != dk or pv.shape[-1] != dv:
                raise ValueError(f"persistent feature sizes must be dk={dk}, dv={dv}")
            dtype = dtype or pk.dtype
            device = device or pk.device
        dtype = dtype or torch.get_default_dtype()
        zeros_long = torch.zeros(batch, dtype=torch.int64, device=device)
        return cls(
            keys=torch.zeros(batch, heads, 0, dk, dtype=dtype, device=device),
            values=torch.zeros(batch, heads, 0, dv, dtype=dtype, device=device),
            length=zeros_long,
            position=zeros_long.clone(),
            persistent_keys=pk,
            persistent_values=pv,
        )

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def persistent_count(self) -> int:
        return 0 if self.persistent_keys is None else self.persistent_keys.shape[1]

    def persistent_rows(self) -> tuple[Tensor, Tensor] | None:
        """The persistent pairs broadcast to (B,H,P,dk), (B,H,P,dv), or None."""
        if self.persistent_keys is None or self.persistent_values is None:
            return None
        batch = self.batch
        return (
            self.persistent_keys.unsqueeze(0).expand(batch, *self.persistent_keys.shape),
            self.persistent_values.unsqueeze(0).expand(batch, *self.persistent_values.shape),
        )

    def slot_positions(self) -> Tensor:
        """(B,N) document position of every slot (meaningful where slot < length)."""
        slots = torch.arange(self.keys.shape[2], device=self.length.device)
        return (self.position - self.length)[:, None] + slots

    def slot_valid(self) -> Tensor:
        """(B,N) bool: the slot holds a cached token."""
        return torch.arange(self.keys.shape[2], device=self.length.device)[None, :] < self.length[:, None]

    def trim(self) -> AttentionState:
        """The same state with capacity cut to the longest row (for comparing implementations)."""
        n = int(self.length.max().item()) if self.batch else 0
        return self._with(self.keys[:, :, :n], self.values[:, :, :n])

    def detach(self) -> AttentionState:
        """The cache cut from the autograd graph (the persistent parameters are left alone)."""
        return self._with(self.keys.detach(), self.values.detach())

    def _with(self, keys: Tensor, values: Tensor) -> AttentionState:
        return AttentionState(keys, values, self.length, self.position, self.persistent_keys, self.persistent_values)

    def select(self, rows: Tensor | slice | int) -> AttentionState:
        """The state of a subset of batch rows (an int keeps the batch dimension)."""
        index = slice(rows, rows + 1) if isinstance(rows, int) else rows
        return AttentionState(
            self.keys[index],
            self.values[index],
            self.length[index],
            self.position[index],
            self.persistent_keys,
            self.persistent_values,
        )

    @classmethod
    def cat(cls, states: Sequence[AttentionState]) -> AttentionState:
        """Concatenate states along the batch dimension (capacities are padded to the largest)."""
        n = max(s.keys.shape[2] for s in states)

        def pad(x: Tensor) -> Tensor:
            return torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))

        first = states[0]
        return cls(
            keys=torch.cat([pad(s.keys) for s in states]),
            values=torch.cat([pad(s.values) for s in states]),
            length=torch.cat([s.length for s in states]),
            position=torch.cat([s.position for s in states]),
            persistent_keys=first.persistent_keys,
            persistent_values=first.persistent_values,
        )

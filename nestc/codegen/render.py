"""Render Triton source for a kernel key from the package's templates (Jinja, StrictUndefined).

The template receives only what `_matrix_context` derives from a validated key: fixed code snippets
chosen by the key's words, and the key's integers. No text of a spec ever reaches it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

import jinja2

from nestc_runtime.kernels.key import MatrixKernelKey, MLPKernelKey

INNER_BLANK = re.compile(r"\n\n(?=        )")
MARKER = re.compile(r"^\s*# nest: (memory|objective|optimizer|update|read)$")


@dataclass(frozen=True)
class Section:
    """Generated lines [first, last] (1-based) that implement one statement of the level."""

    statement: str
    first: int
    last: int


@dataclass(frozen=True)
class GeneratedKernel:
    key: MatrixKernelKey | MLPKernelKey
    source: str
    sections: tuple[Section, ...]

    @property
    def file_name(self) -> str:
        return f"{self.key.digest()}.py"


@functools.cache
def _environment() -> jinja2.Environment:
    loader = jinja2.FunctionLoader(_template_text)
    return jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _template_text(name: str) -> str:
    return resources.files("nestc.codegen").joinpath("templates", name).read_text(encoding="utf-8")


def _matrix_context(key: MatrixKernelKey) -> dict[str, object]:
    """The template's variables: which terms exist, and the snippets that differ between keys."""
    zeros = f"tl.zeros([{key.block}], dtype=tl.float32)"
    l2, dgd, token = key.objective == "l2", key.optimizer == "dgd", key.per_token
    # The linearisation point of token i is exp(log_lam_i) S_0 (plus earlier in-block updates at C = 1).
    log_lam = "g_out" if key.decay == "before" else ("g_in" if token else zeros)
    lam_target = {"g_out": "d_g_out", "g_in": "d_g_in"}.get(log_lam, "") if l2 else ""
    beta = " + ".join(term for term, on in (("tl.exp(log_lam)", l2), ("tl.exp(g_in)", dgd)) if on)
    coupling = " + ".join(term for term, on in (("M_lin", l2 and token), ("M_own", dgd)) if on)
    # The read state S_tau: tau = after the token, before it, or the chunk start.
    if key.read == "online":
        log_tau, read_mask = "g_out", "i[:, None] >= i[None, :]"
    elif key.read == "before" or token:
        log_tau, read_mask = "g_in", "i[:, None] > i[None, :]"
    else:  # boundary with one chunk per block: the block's start state
        log_tau, read_mask = zeros, ""
    return {
        "key_text": key.text(),
        "BT": key.block,
        "DK": key.d_key,
        "DV": key.d_value,
        "precision": "ieee" if key.dtype == "fp32" else "tf32",
        "objective": key.objective,
        "dgd": dgd,
        "has_base": l2 or dgd,
        "coupled": bool(coupling),
        "lin_in_block": l2 and token,
        "log_lam": log_lam,
        "lam_target": lam_target,
        "beta": beta,
        "coupling": coupling,
        "log_tau": log_tau,
        "intra_read": bool(read_mask),
        "read_mask": read_mask,
        "tau_target": {"g_out": "d_g_out", "g_in": "d_g_in"}.get(log_tau, ""),
    }


def sections_of(source: str) -> tuple[Section, ...]:
    """The `# nest: <statement>` markers: each section runs to the line before the next marker (or the
    end of the enclosing loop body, approximated by the next marker or the end of the file)."""
    lines = source.splitlines()
    marks = [(n + 1, m.group(1)) for n, line in enumerate(lines) if (m := MARKER.match(line))]
    ends = [first - 1 for first, _ in marks[1:]] + [len(lines)]
    return tuple(Section(statement, first, last) for (first, statement), last in zip(marks, ends))


def _momentum_context(key: MatrixKernelKey) -> dict[str, object]:
    """`momentum_gd`: its own template (two carried states); the snippets that differ between keys."""
    token = key.per_token
    ones = f"tl.full([{key.block}], 1.0, tl.float32)"
    return {
        "key_text": key.text(),
        "BT": key.block,
        "DK": key.d_key,
        "DV": key.d_value,
        "precision": "ieee" if key.dtype == "fp32" else "tf32",
        "objective": key.objective,
        "decay": key.decay,
        "read": key.read,
        "token": token,
        "need_before": (token and key.objective == "l2") or key.read == "before" or (token and key.read == "boundary"),
        "need_online": key.read == "online",
        "rho": "tl.exp(la)" if key.decay == "before" else ones,
        "lam": "tl.exp(g_out)" if key.decay == "before" else ones,
    }


@functools.lru_cache(maxsize=256)
def render_matrix(key: MatrixKernelKey) -> GeneratedKernel:
    """The Triton module for a matrix-memory key (cached by key)."""
    if key.optimizer == "momentum_gd":
        template, context = "matrix_momentum.py.jinja", _momentum_context(key)
    else:
        template, context = "matrix_memory.py.jinja", _matrix_context(key)
    source = _environment().get_template(template).render(**context)
    source = INNER_BLANK.sub("\n", source)  # a macro's closing newline inside a loop body
    return GeneratedKernel(key, source, sections_of(source))


LN_EPS = 1e-5  # the runtime's LayerNorm epsilon (MLPMemoryConfig.ln_eps)


@functools.lru_cache(maxsize=256)
def render_mlp(key: MLPKernelKey) -> GeneratedKernel:
    """The Triton module (forward and update) for an MLP-memory key (cached by key)."""
    context = {
        "key_text": key.text(),
        "C": key.chunk,
        "D": key.d,
        "H": key.hidden,
        "norm": key.norm,
        "ln_eps": repr(LN_EPS),
        "objective": key.objective,
        "read": key.read,
        "precision": "ieee" if key.dtype == "fp32" else "tf32",
    }
    source = _environment().get_template("mlp_memory.py.jinja").render(**context)
    source = INNER_BLANK.sub("\n", source)
    return GeneratedKernel(key, source, sections_of(source))

"""Stable diagnostic codes and their long explanations (`nestc explain E0NN`)."""

from __future__ import annotations

EXPLANATIONS: dict[str, tuple[str, str]] = {
    # syntax
    "E001": ("unexpected token", "The parser met a word or symbol that cannot come here. The hint lists what could."),
    "E002": ("unexpected character", "A character that is not part of the language (names are letters, digits, `_`)."),
    "E003": ("unexpected end of file", "The file ends inside a definition; usually a missing `}` or `)`."),
    # names and kinds
    "E010": ("unknown name", "A name that is not a parameter, level, binding, layer or function in scope."),
    "E011": ("unknown kind", "A memory, objective, optimizer or layer kind that nestc does not know."),
    "E012": ("duplicate definition", "Two levels, bindings or parameters share a name."),
    "E013": ("missing statement", "A level or system lacks something it needs (a `model` binding, an `update`)."),
    "E014": ("duplicate statement", "A level states the same thing twice (two `update` statements, say)."),
    "E015": ("bad arguments", "A call has an unknown keyword, a missing argument or the wrong number of them."),
    "E016": (
        "bad value",
        "A value has the wrong type or range (a chunk size must be a positive integer). Limits that keep a hostile "
        "spec from exhausting the machine are E016 too: names of at most 64 characters, nesting at most 128 deep, "
        "at most 1024 copies in `block * n` or values in a level range, constants that fit a 32-bit float.",
    ),
    "E017": ("unknown parameter", "`--set NAME=V` names no parameter of the system."),
    "E018": ("bad composition", "Something that is not a layer or level is used in the model."),
    # rules of DESIGN §3
    "E020": (
        "evaluation-order cycle",
        "Rule 1: at each token, read sites and updates must form an acyclic graph. A level reading its own "
        "`online` state to generate its keys, values or rates needs its update before the update happens. "
        "Read a `boundary` or `before` state instead.",
    ),
    "E021": (
        "nested level slower than its owner",
        "Rule 2: a level nested in another (`level B in A`) must update at least as often as A.",
    ),
    "E022": (
        "nested chunk does not divide its owner's",
        "Rule 2: when both levels count tokens, the inner level's chunk must divide the outer level's chunk.",
    ),
    "E023": (
        "parameter ownership",
        "Rule 3: every parameter belongs to exactly one level, trained by exactly one optimizer. The model's "
        "layers belong to the single outermost `every step` level; give each level an owner with `in`.",
    ),
    "E024": ("bad owner", "`level B in A` names a level A that does not exist, or owners form a cycle."),
    "E025": ("shape mismatch", "Sizes do not fit: `d` must be divisible by `heads`, rates have a fixed shape."),
    "E026": ("unsupported form", "The statement is well formed but nestc does not support this form of it."),
    "E027": ("read of unknown state", "A read mode was asked of something that is not an in-context level."),
    "E028": (
        "value needed before it exists",
        "Rule 4: a level reads another level's `online` state at token t, but that level comes later in the "
        "model and takes this level's output as its input at t. Read its `boundary` or `before` state.",
    ),
    "E029": (
        "`decay before` with `dgd`",
        "DGD's factor (αI − η k kᵀ) already applies the retention α to the state; retention cannot also act "
        "before the gradient.",
    ),
    "E030": (
        "bad import",
        "An imported file is missing, is not a fragment, is not a `.nest` file (nothing else is ever read), or "
        "imports form a cycle.",
    ),
    "E040": (
        "not supported by the runtime yet",
        "The spec is valid and checks clean, but the runtime cannot run this combination yet; `nestc check` "
        "accepts it, `nestc compile` and `nestc train` refuse it and say which part is missing (e.g. an MLP "
        "memory other than depth 1 or residual depth 2, a windowed objective with `dgd`).",
    ),
    # warnings
    "W001": ("parameter without gradient", "A parameter that no gradient reaches: it will never train."),
    "W002": (
        "task chunk longer than the training sequence",
        "A level with `objective task` updates at the end of each chunk; a chunk at least the training "
        "sequence length never completes inside a sequence.",
    ),
    "W003": (
        "no parallel form",
        "The combination of memory, optimizer and frequency has no known chunked form, so it runs as a "
        "scan (one token at a time, in torch.compile'd blocks of tokens, NESTC_COMPILED_SCAN=0 runs it eagerly). "
        "The hint names the nearest parallel alternative. A windowed objective (`window = c`) runs in parallel "
        "only with `gd` (as c virtual tokens per token).",
    ),
    "W004": (
        "rate may leave its range",
        "A data-dependent rate whose expression can take values outside its range: η ≥ 0, α and β in [0, 1] "
        "(a constant outside is error E016). The check is interval arithmetic over the expression: learned "
        "projections are unbounded, `sigmoid` is in [0, 1], so `sigmoid(linear(x)) * 0.1` passes and "
        "`linear(x)` does not.",
    ),
}


def explain(code: str) -> str | None:
    entry = EXPLANATIONS.get(code.upper())
    if entry is None:
        return None
    title, text = entry
    return f"{code.upper()}: {title}\n\n{text}"

"""AST to IR: resolve imports, names, parameters and compositions; give every statement its meaning.

Errors are collected (not raised one at a time) so that a file's every mistake is reported in one run.
Kinds resolve through the closed catalogue (`catalogue.py`), never by importing a name found in a spec.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..diagnostics import CompileError, DiagnosticBag, Span
from ..language import ast
from . import catalogue as cat
from . import models as ir

ROLES: tuple[ir.Role, ...] = ("queries", "keys", "values", "targets")
IN_CONTEXT_ONLY = {"memory", "queries", "keys", "values", "targets", "objective", "decay", "read", "outer gradient"}
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: expression constants must fit the runtime's dtype
MAX_REPEAT = 1024  # `block * n` copies; instance names carry at most 4 index digits
MAX_NS_STEPS = 100  # Newton–Schulz iterations: 5 is usual, and every one is a matmul chain per token
# A fragment loader: (path as written, span of the import) -> the fragment's AST, or None after an error.
FragmentLoader = Callable[[str, Span], "ast.System | None"]
ParamValue = float | int | str | list[float | int]


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


class _ExprError(Exception):
    """Raised inside expression elaboration after the diagnostic was recorded."""


class Elaborator:
    def __init__(
        self,
        system: ast.System,
        overrides: Mapping[str, ParamValue] | None = None,
        load_fragment: FragmentLoader | None = None,
    ) -> None:
        self.ast = system
        self.overrides = dict(overrides or {})
        self.load_fragment = load_fragment
        self.bag = DiagnosticBag()
        self.params: dict[str, ParamValue] = {}
        self.level_asts: dict[str, ast.Level] = {}
        self.bindings: dict[str, ast.Binding] = {}
        self.range_levels: dict[str, list[str]] = {}  # `cms` -> ["cms[0]", "cms[1]", ...]
        self.local: dict[str, ParamValue] = {}  # names bound by a level range while elaborating it

    # ---- entry point
    def run(self) -> ir.System:
        if self.ast.is_fragment:
            self.bag.error(
                "E030",
                f"`{self.ast.name.id}` is a fragment: it is imported by a system, not compiled alone",
                self.ast.name.span,
                'write a system that says `import "<this file>"`',
            )
            raise CompileError(self.bag.items)
        self._collect_params()
        self._collect_items(self._imported_items() + list(self.ast.items))
        levels = [lv for a in self.level_asts.values() for lv in self._levels(a)]
        model = self._model()
        self.bag.raise_if_errors()
        assert model is not None
        return ir.System(name=self.ast.name.id, params=self.params, levels=levels, model=model, span=self.ast.span)

    # ---- imports
    def _imported_items(self) -> list[ast.Level | ast.Binding]:
        items: list[ast.Level | ast.Binding] = []
        for imp in self.ast.imports:
            fragment = self.load_fragment(imp.path, imp.span) if self.load_fragment else None
            if fragment is None:
                if self.load_fragment is None:
                    self.bag.error("E030", "imports need a file to be resolved against", imp.span)
                continue
            if not fragment.is_fragment:
                self.bag.error(
                    "E030",
                    f'"{imp.path}" is a system, not a fragment',
                    imp.span,
                    "put the shared levels and bindings in a file that starts `fragment NAME {`",
                )
                continue
            items.extend(fragment.items)
        return items

    # ---- parameters
    def _collect_params(self) -> None:
        for param in self.ast.params:
            name = param.name.id
            if name in self.params:
                self.bag.error("E012", f"parameter `{name}` is defined twice", param.name.span)
                continue
            value = self._param_value(param.default, f"the default of `{name}`")
            if value is not None:
                self.params[name] = value
        for name, value in self.overrides.items():
            if name not in self.params:
                hint = suggest(name, self.params) or f"the parameters are: {', '.join(self.params) or 'none'}"
                self.bag.error(
                    "E017", f"`--set {name}=...` names no parameter of `{self.ast.name.id}`", self.ast.name.span, hint
                )
            elif _kind(value) != _kind(self.params[name]):
                self.bag.error(
                    "E016",
                    f"`--set {name}`: `{name}` is a {_kind(self.params[name])}, not a {_kind(value)}",
                    self.ast.name.span,
                )
            else:
                self.params[name] = _normalise(value)

    def _param_value(self, expr: ast.Expr, what: str) -> ParamValue | None:
        if isinstance(expr, ast.ListExpr):
            items = [self._constant(item, f"an element of {what}") for item in expr.items]
            if any(i is None for i in items):
                return None
            return [i for i in items if i is not None]
        if isinstance(expr, ast.Name) and expr.id not in self.params:
            return expr.id  # a word, e.g. `read = before`
        return self._constant(expr, what)

    def _constant(self, expr: ast.Expr, what: str) -> float | int | None:
        """Evaluate a number made of numbers, parameters and arithmetic."""
        try:
            value = self._eval_const(expr)
        except _NotConstant as exc:
            self.bag.error(
                "E016", f"{what} must be a number", exc.span, "numbers, number parameters and + - * / of them"
            )
            return None
        if not math.isfinite(value):
            self.bag.error("E016", f"{what} is not a finite number", expr.span)
            return None
        return _normalise(value)  # type: ignore[return-value]

    def _eval_const(self, expr: ast.Expr) -> float:
        if isinstance(expr, ast.Number):
            return expr.value
        if isinstance(expr, ast.Name):
            value = self.local.get(expr.id, self.params.get(expr.id))
            if isinstance(value, (int, float)):
                return float(value)
            raise _NotConstant(expr.span)
        if isinstance(expr, ast.Neg):
            return -self._eval_const(expr.operand)
        if isinstance(expr, ast.BinOp):
            left, right = self._eval_const(expr.left), self._eval_const(expr.right)
            if expr.op == "+":
                return left + right
            if expr.op == "-":
                return left - right
            if expr.op == "*":
                return left * right
            if right == 0:
                raise _NotConstant(expr.right.span)
            return left / right
        raise _NotConstant(expr.span)

    def _positive_int(self, expr: ast.Expr, what: str) -> int | None:
        if isinstance(expr, ast.Name) and expr.id not in self.params and expr.id not in self.local:
            self.bag.error("E010", f"unknown name `{expr.id}` in {what}", expr.span, suggest(expr.id, self.params))
            return None
        value = self._constant(expr, what)
        if value is None:
            return None
        if not float(value).is_integer() or value < 1:
            self.bag.error("E016", f"{what} must be a positive integer, not {value}", expr.span)
            return None
        return int(value)

    def _word(self, name: ast.Name, allowed: tuple[str, ...], what: str) -> str | None:
        """A word such as `before`, given directly or through a parameter (`read = before`)."""
        value: Any = name.id
        if name.id in self.params or name.id in self.local:
            value = self.local.get(name.id, self.params.get(name.id))
        if value in allowed:
            return str(value)
        shown = f"`{name.id}`" + (f" (= {value})" if value != name.id else "")
        hint = suggest(str(value), allowed) or f"{what}: {', '.join(allowed)}"
        self.bag.error("E016", f"{shown} is not a {what}", name.span, hint)
        return None

    # ---- names
    def _collect_items(self, items: list[ast.Level | ast.Binding]) -> None:
        for item in items:
            name = item.name.id
            if name in self.level_asts or name in self.bindings:
                self.bag.error("E012", f"`{name}` is defined twice", item.name.span)
            elif isinstance(item, ast.Level):
                self.level_asts[name] = item
            else:
                self.bindings[name] = item
            if name in self.params:
                what = "level" if isinstance(item, ast.Level) else "binding"
                self.bag.error("E012", f"`{name}` is both a parameter and a {what}", item.name.span)

    def _is_in_context(self, name: str) -> bool:
        level = self.level_asts.get(name)
        return level is not None and any(s.keyword == "memory" for s in level.statements)

    # ---- levels
    def _levels(self, level: ast.Level) -> list[ir.Level]:
        if level.range is None:
            single = self._level(level, level.name.id)
            return [single] if single is not None else []
        values = self._range_values(level.range)
        names = [f"{level.name.id}[{i}]" for i in range(len(values))]
        self.range_levels[level.name.id] = names
        out = []
        for name, value in zip(names, values):
            self.local = {level.range.var.id: value}
            elaborated = self._level(level, name)
            if elaborated is not None:
                out.append(elaborated)
        self.local = {}
        return out

    def _range_values(self, level_range: ast.LevelRange) -> list[float | int]:
        over = level_range.over
        value: Any = None
        if isinstance(over, ast.Name):
            value = self.params.get(over.id)
            if value is None:
                self.bag.error("E010", f"unknown name `{over.id}`", over.span, suggest(over.id, self.params))
                return []
        elif isinstance(over, ast.ListExpr):
            value = self._param_value(over, "the list")
        if not isinstance(value, list) or not value:
            self.bag.error(
                "E016", "a level repeats over a non-empty list", over.span, "e.g. `level cms[c in [16, 64, 256]]`"
            )
            return []
        if len(value) > MAX_REPEAT:  # each value is a level instance: refuse a memory bomb early
            self.bag.error("E016", f"a level repeats over {len(value)} values", over.span, f"at most {MAX_REPEAT}")
            return []
        return value

    def _level(self, level: ast.Level, name: str) -> ir.Level | None:
        stmts: dict[str, ast.Statement] = {}
        for stmt in level.statements:
            if stmt.keyword in stmts:
                self.bag.error(
                    "E014", f"level `{level.name.id}` says `{stmt.keyword}` twice", stmt.span, "keep one of them"
                )
            else:
                stmts[stmt.keyword] = stmt
        owner = level.owner.id if level.owner else None
        if level.owner and level.owner.id not in self.level_asts:
            self.bag.error(
                "E024",
                f"level `{level.name.id}` is nested in unknown level `{level.owner.id}`",
                level.owner.span,
                suggest(level.owner.id, self.level_asts),
            )
        update = self._frequency(stmts.get("update"), level)
        spans = {k: s.span for k, s in stmts.items()}
        if "memory" in stmts:
            return self._in_context_level(level, name, stmts, owner, update, spans)
        return self._outer_level(level, name, stmts, owner, update, spans)

    def _frequency(self, stmt: ast.Statement | None, level: ast.Level) -> ir.Frequency:
        if stmt is None:
            self.bag.error(
                "E013",
                f"level `{level.name.id}` has no `update` statement",
                level.name.span,
                "say how often it updates, e.g. `update every token` or `update every step`",
            )
            return ir.Frequency(unit="frozen")
        freq = stmt.value
        assert isinstance(freq, ast.Frequency)
        count = 1
        if freq.count is not None:
            count = self._positive_int(freq.count, "an update frequency") or 1
        return ir.Frequency(unit=freq.unit, count=count)  # type: ignore[arg-type]

    # ---- outer (optimizer) levels
    def _outer_level(
        self,
        level: ast.Level,
        name: str,
        stmts: dict[str, ast.Statement],
        owner: str | None,
        update: ir.Frequency,
        spans: dict[str, Span],
    ) -> ir.Level | None:
        for key in sorted(IN_CONTEXT_ONLY & stmts.keys()):
            self.bag.error(
                "E013",
                f"`{key}` needs a `memory` statement in level `{level.name.id}`",
                stmts[key].span,
                "an in-context level says what it stores, e.g. `memory matrix per head`",
            )
        if update.unit == "token":
            self.bag.error(
                "E016",
                f"level `{level.name.id}` updates every token but has no memory",
                stmts["update"].span,
                "add a `memory` statement, or update `every step`",
            )
        outer = None
        if "optimizer" in stmts:
            outer = self._outer_optimizer(stmts["optimizer"])
        elif update.unit != "frozen":
            self.bag.error(
                "E013",
                f"level `{level.name.id}` has no `optimizer` statement",
                level.name.span,
                "e.g. `optimizer adamw(lr = 3e-3, weight_decay = 0.1)`",
            )
        selectors = self._selectors(stmts.get("params"))
        return ir.Level(
            name=name, owner=owner, update=update, outer=outer, selectors=selectors, span=level.span, spans=spans
        )

    def _selectors(self, stmt: ast.Statement | None) -> list[str]:
        if stmt is None:
            return []
        assert isinstance(stmt.value, ast.Selectors)
        out = []
        for sel in stmt.value.names:
            if sel.id in ir.SELECTORS or self._is_in_context(sel.id):
                out.append(sel.id)
            else:
                hint = suggest(sel.id, [*ir.SELECTORS, *self.level_asts]) or f"selectors: {', '.join(ir.SELECTORS)}"
                self.bag.error("E010", f"unknown parameter selector `{sel.id}`", sel.span, hint)
        return out

    def _outer_optimizer(self, stmt: ast.Statement) -> ir.OuterOptimizer | None:
        call = self._as_call(stmt.value, "an optimizer")
        if call is None:
            return None
        if call.fn.id not in cat.OUTER_OPTIMIZERS:
            hint = suggest(call.fn.id, cat.OUTER_OPTIMIZERS) or f"outer optimizers: {', '.join(cat.OUTER_OPTIMIZERS)}"
            if call.fn.id in cat.INNER_OPTIMIZERS:
                hint = f"`{call.fn.id}` is an inner optimizer: it needs a `memory` in this level"
            self.bag.error("E011", f"unknown outer optimizer `{call.fn.id}`", call.fn.span, hint)
            return None
        args = self._arguments(call, cat.OUTER_OPTIMIZERS[call.fn.id])
        hyper = {k: float(v) for k, v in args.items() if isinstance(v, (int, float))}
        for kw in call.kwargs:
            low, high, shown = cat.OUTER_RANGES.get(kw.name.id, (-math.inf, math.inf, ""))
            value = hyper.get(kw.name.id)
            if value is not None and not low <= value < high:
                message = f"`{kw.name.id} = {value:g}` of `{call.fn.id}` is outside {shown}"
                self.bag.error("E016", message, kw.value.span, f"use a value in {shown}")
        if "steps" in hyper and self._ns_steps(hyper["steps"], call) is None:  # muon, m3
            return None
        return ir.OuterOptimizer(kind=call.fn.id, hyper=hyper)  # type: ignore[arg-type]

    # ---- in-context levels
    def _in_context_level(
        self,
        level: ast.Level,
        name: str,
        stmts: dict[str, ast.Statement],
        owner: str | None,
        update: ir.Frequency,
        spans: dict[str, Span],
    ) -> ir.Level | None:
        memory = self._memory(stmts["memory"])
        if "params" in stmts:
            self.bag.error(
                "E026",
                "`params` selects what an outer optimizer level trains",
                stmts["params"].span,
                "an in-context level trains its own memory; nest it with `in` instead",
            )
        objective = self._objective(stmts.get("objective"), level, memory)
        roles = self._roles(level, name, stmts, memory, objective)
        inner = self._inner_optimizer(stmts.get("optimizer"), level, stmts.get("decay"), memory, objective)
        self._check_in_context_update(level, stmts, update, memory)
        read = self._read(stmts.get("read"), memory)
        gradient = self._gradient(stmts.get("outer gradient"))
        if memory is None or (memory.kind in ("matrix", "mlp") and (objective is None or inner is None)):
            return None
        return ir.Level(
            name=name,
            owner=owner,
            update=update,
            memory=memory,
            roles=roles,
            objective=objective,
            inner=inner,
            read=read,
            gradient=gradient,
            stopgrad_targets="stopgrad targets" in stmts,
            span=level.span,
            spans=spans,
        )

    def _check_in_context_update(
        self, level: ast.Level, stmts: dict[str, ast.Statement], update: ir.Frequency, memory: ir.Memory | None
    ) -> None:
        where = stmts["update"].span if "update" in stmts else level.name.span
        if memory is not None and memory.kind == "gradients":
            self._check_gradient_memory(stmts, update, where)
            return
        if memory is not None and memory.kind == "persistent":
            if update.unit == "token":
                self.bag.error(
                    "E016",
                    "a persistent memory is frozen in context: it learns only from the outer loss",
                    where,
                    "write `update every step` (trained with its owner) or `update frozen`",
                )
            return
        if memory is not None and memory.kind == "kv" and (update.unit, update.count) != ("token", 1):
            self.bag.error("E016", "a `kv` memory (attention) takes in every token", where, "`update every token`")
        elif update.unit != "token":
            self.bag.error(
                "E016",
                f"in-context level `{level.name.id}` must update in tokens, not `{update.describe()}`",
                where,
                "e.g. `update every token` or `update every 16 tokens`",
            )

    def _check_gradient_memory(self, stmts: dict[str, ast.Statement], update: ir.Frequency, where: Span) -> None:
        """A gradient memory (momentum as a level) takes in its owner's outer gradient once per training step;
        the gradients are its only data, so it has no roles, reads or outer gradient of its own."""
        if update.unit != "step":
            hint = "`update every step` (or every N steps, as its owner)"
            self.bag.error("E016", "a gradient memory takes in the outer gradient once per training step", where, hint)
        for key in sorted(stmts.keys() & {*ROLES, "read", "decay", "outer gradient", "stopgrad targets"}):
            self.bag.error(
                "E026",
                f"a gradient memory has no `{key}`: its data are the gradients of the parameters its owner trains",
                stmts[key].span,
                "remove it; write `objective dot` (momentum) or `objective l2` (an average of gradients)",
            )

    def _roles(
        self,
        level: ast.Level,
        name: str,
        stmts: dict[str, ast.Statement],
        memory: ir.Memory | None,
        objective: ir.Objective | None,
    ) -> dict[ir.Role, ir.Expr]:
        roles: dict[ir.Role, ir.Expr] = {}
        for role in ROLES:
            if role in stmts:
                value = stmts[role].value
                assert not isinstance(value, (ast.Frequency, ast.GradientMode, ast.Selectors))
                expr = self._expr(value, name, role)
                if expr is not None:
                    roles[role] = expr
        needs = self._required_roles(memory, objective)
        for missing in sorted(needs - set(stmts)):
            self.bag.error(
                "E013",
                f"level `{level.name.id}` has no `{missing}` statement",
                level.name.span,
                f"e.g. `{missing} linear(x)`",
            )
        if objective is not None and objective.target == "targets" and "targets" not in stmts:
            self.bag.error(
                "E013",
                f"the objective of `{level.name.id}` compares with `targets`, which it does not define",
                level.name.span,
                f"e.g. `targets {level.name.id}(values, read = boundary)`",
            )
        return roles

    @staticmethod
    def _required_roles(memory: ir.Memory | None, objective: ir.Objective | None) -> set[str]:
        if memory is None or memory.kind in ("persistent", "gradients"):
            return set()
        if memory.kind == "kv":
            return {"keys", "values"}
        if objective is not None and objective.kind == "task":
            return set()
        return {"keys", "values"}

    def _read(self, stmt: ast.Statement | None, memory: ir.Memory | None) -> ir.ReadMode:
        if stmt is None:
            default = "boundary" if memory is not None and memory.kind == "persistent" else "online"
            return ir.ReadMode(mode=default)  # type: ignore[arg-type]
        assert isinstance(stmt.value, ast.Name)
        mode = self._word(stmt.value, cat.READ_MODES, "read mode") or "online"
        every = None
        if stmt.count is not None:
            every = self._positive_int(stmt.count, "a read boundary")
            if mode != "boundary":
                self.bag.error(
                    "E016",
                    "only a `boundary` read can name a coarser boundary",
                    stmt.span,
                    "`read boundary every 512 tokens`",
                )
        return ir.ReadMode(mode=mode, every=every)  # type: ignore[arg-type]

    def _gradient(self, stmt: ast.Statement | None) -> ir.GradientMode:
        if stmt is None:
            return ir.GradientMode()
        mode = stmt.value
        assert isinstance(mode, ast.GradientMode)
        k = 1
        if mode.count is not None:
            k = self._positive_int(mode.count, "`truncate`") or 1
        return ir.GradientMode(mode=mode.mode, k=k)  # type: ignore[arg-type]

    def _memory(self, stmt: ast.Statement) -> ir.Memory | None:
        value = stmt.value
        per_head = False
        if isinstance(value, ast.Per):
            if value.axis.id != "head":
                self.bag.error("E016", f"a memory is `per head`, not `per {value.axis.id}`", value.axis.span)
            per_head = True
            value = value.value
        call = self._as_call(value, "a memory")
        if call is None:
            return None
        if call.fn.id not in cat.MEMORIES:
            hint = suggest(call.fn.id, cat.MEMORIES) or f"memories: {', '.join(cat.MEMORIES)}"
            self.bag.error("E011", f"unknown memory kind `{call.fn.id}`", call.fn.span, hint)
            return None
        args = self._arguments(call, cat.MEMORIES[call.fn.id])
        fields: dict[str, Any] = {"kind": call.fn.id, "per_head": per_head}
        for key in ("depth", "window", "segment", "tokens"):
            if key in args and (number := self._int_arg(args[key], key, call)) is not None:
                fields[key] = number  # after an error the field keeps its default (the error is reported)
        for key in ("expand", "norm", "activation", "persistent"):
            if key in args:
                fields[key] = args[key]
        expand = fields.get("expand")
        if isinstance(expand, (int, float)) and expand <= 0:
            hint = "the hidden layer is expand × d_key wide"
            self.bag.error("E016", f"`expand` must be positive, not {expand:g}", call.span, hint)
            del fields["expand"]
        fields["residual"] = bool(args.get("residual", False))
        persistent = fields.get("persistent")
        if persistent is not None and self._memory_kind(str(persistent)) != "persistent":
            self.bag.error(
                "E027",
                f"`persistent = {persistent}` must name a level with `memory persistent(...)`",
                call.span,
                "e.g. `level persist { memory persistent(tokens = 4) per head; update frozen }`",
            )
        return ir.Memory(**fields)

    def _memory_kind(self, level_name: str) -> str | None:
        level = self.level_asts.get(level_name)
        if level is None:
            return None
        for stmt in level.statements:
            if stmt.keyword == "memory":
                value = stmt.value.value if isinstance(stmt.value, ast.Per) else stmt.value
                if isinstance(value, ast.Call):
                    return value.fn.id
                if isinstance(value, ast.Name):
                    return value.id
        return None

    def _ns_steps(self, value: float | None, call: ast.Call) -> int | None:
        """`steps` of `newton_schulz`: a positive integer, at most MAX_NS_STEPS (a spec must not hang the run)."""
        steps = None if value is None else self._int_arg(value, "steps", call)
        if steps is not None and steps > MAX_NS_STEPS:
            self.bag.error("E016", f"`steps = {steps}` Newton–Schulz iterations", call.span, f"at most {MAX_NS_STEPS}")
            return None
        return steps

    def _int_arg(self, value: Any, key: str, call: ast.Call) -> int | None:
        if not float(value).is_integer() or value < 1:
            self.bag.error("E016", f"`{key}` must be a positive integer, not {value}", call.span)
            return None
        return int(value)

    def _objective(self, stmt: ast.Statement | None, level: ast.Level, memory: ir.Memory | None) -> ir.Objective | None:
        name = level.name.id
        if memory is not None and memory.kind in ("kv", "persistent"):
            if stmt is not None:
                self.bag.error(
                    "E026",
                    f"a `{memory.kind}` memory has no inner objective",
                    stmt.span,
                    "attention stores every key and value; remove the `objective` statement",
                )
            return None
        if stmt is None:
            self.bag.error(
                "E013",
                f"level `{name}` has no `objective` statement",
                level.name.span,
                f"e.g. `objective l2({name}(keys), values)`",
            )
            return None
        call = self._as_call(stmt.value, "an objective")
        if call is None:
            return None
        kind = call.fn.id
        if kind not in cat.OBJECTIVES:
            hint = suggest(kind, cat.OBJECTIVES) or f"objectives: {', '.join(cat.OBJECTIVES)}"
            self.bag.error("E011", f"unknown objective `{kind}`", call.fn.span, hint)
            return None
        if kind == "task":
            if call.args or call.kwargs:
                self.bag.error("E015", "`task` takes no arguments: it is the outer loss itself", call.span)
            return ir.Objective(kind="task")
        if memory is not None and memory.kind == "gradients":
            return self._gradient_objective(call)
        sig = cat.OBJECTIVES[kind]
        target = self._objective_target(call, name)
        extra = ast.Call(call.fn, (), call.kwargs, call.span)
        args = self._arguments(extra, sig)
        for needed in sorted(sig.numbers - cat.OPTIONAL_OBJECTIVE_NUMBERS - args.keys()):
            self.bag.error(
                "E015",
                f"`{kind}` needs `{needed} = ...`",
                call.span,
                f"e.g. `{kind}({name}(keys), values, {needed} = {'3' if needed == 'p' else '1'})`",
            )
        window = self._int_arg(args["window"], "window", call) if "window" in args else None
        if target is None:
            return None
        fields = {"p": args.get("p"), "delta": args.get("delta"), "window": window}
        return ir.Objective(kind=kind, target=target, **fields)  # type: ignore[arg-type]

    def _gradient_objective(self, call: ast.Call) -> ir.Objective | None:
        """A gradient memory's objective is written bare: `dot` (−⟨m, g⟩) or `l2` (½‖m − g‖²)."""
        if call.fn.id not in ("dot", "l2") or call.args or call.kwargs:
            self.bag.error(
                "E026",
                "a gradient memory's objective is a bare `dot` (momentum) or `l2` (an average of gradients)",
                call.span,
                "write `objective dot`",
            )
            return None
        return ir.Objective(kind=call.fn.id)  # type: ignore[arg-type]

    def _objective_target(self, call: ast.Call, name: str) -> str | None:
        args = call.args
        first_ok = (
            len(args) == 2
            and isinstance(args[0], ast.Call)
            and args[0].fn.id == name
            and len(args[0].args) == 1
            and isinstance(args[0].args[0], ast.Name)
            and args[0].args[0].id == "keys"
        )
        target = args[1].id if len(args) == 2 and isinstance(args[1], ast.Name) else None
        if not first_ok or target not in ("values", "targets"):
            self.bag.error(
                "E026",
                "the objective must compare this level's memory of its keys with its values (or targets)",
                call.span,
                f"write `{call.fn.id}({name}(keys), values)`",
            )
            return None
        return target

    def _inner_optimizer(
        self,
        stmt: ast.Statement | None,
        level: ast.Level,
        decay: ast.Statement | None,
        memory: ir.Memory | None,
        objective: ir.Objective | None,
    ) -> ir.InnerOptimizer | None:
        name = level.name.id
        if memory is not None and memory.kind in ("kv", "persistent"):
            if stmt is not None:
                self.bag.error(
                    "E026", f"a `{memory.kind}` memory has no inner optimizer", stmt.span, "remove the `optimizer`"
                )
            return None
        if stmt is None:
            self.bag.error(
                "E013",
                f"level `{name}` has no `optimizer` statement",
                level.name.span,
                "e.g. `optimizer gd(lr = 1, retain = 1)`",
            )
            return None
        call = self._as_call(stmt.value, "an optimizer")
        if call is None:
            return None
        kind = call.fn.id
        if kind not in cat.INNER_OPTIMIZERS:
            hint = suggest(kind, cat.INNER_OPTIMIZERS) or f"inner optimizers: {', '.join(cat.INNER_OPTIMIZERS)}"
            if kind in cat.OUTER_OPTIMIZERS:
                hint = f"`{kind}` is an outer optimizer; an in-context memory uses e.g. `gd`"
            self.bag.error("E011", f"unknown inner optimizer `{kind}`", call.fn.span, hint)
            return None
        sig = cat.INNER_OPTIMIZERS[kind]
        rates: dict[str, ir.Rate] = {}
        for kw in self._kwargs_only(call, sig.keywords(), sig.flags):
            if kw.name.id in sig.rates:
                rate = self._rate(kw.value, level.name.id, kw.name.id)
                if rate is not None:
                    rates[kw.name.id] = rate
        for missing in sorted(sig.required_rates - {kw.name.id for kw in call.kwargs}):
            self.bag.error("E015", f"`{kind}` needs `{missing} = ...`", call.span)
        if not sig.required_rates <= rates.keys():
            return None
        numbers = {
            kw.name.id: self._constant(kw.value, f"`{kw.name.id}`") for kw in call.kwargs if kw.name.id in sig.numbers
        }
        decay_mode = "after"
        if decay is not None:
            assert isinstance(decay.value, ast.Name)
            decay_mode = self._word(decay.value, cat.DECAYS, "decay") or "after"
            if kind == "dgd" and decay_mode == "before":
                self.bag.error(
                    "E029",
                    "`decay before` with `dgd`: the DGD factor (αI − η k kᵀ) already carries the retention",
                    decay.span,
                    "remove `decay before` (DGD applies α inside its factor)",
                )
        if objective is not None and objective.kind == "task" and kind != "gd":
            self.bag.error(
                "E026", "a task-objective level steps once per chunk with `gd`", call.fn.span, "use `gd(lr = ...)`"
            )
        steps = self._ns_steps(numbers.get("steps"), call)
        return ir.InnerOptimizer(
            kind=kind,  # type: ignore[arg-type]
            lr=rates["lr"],
            retain=rates.get("retain", ir.Rate(expr=ir.Const(value=1.0), shape="scalar")),
            momentum=rates.get("momentum"),
            decay=decay_mode,  # type: ignore[arg-type]
            steps=int(steps) if steps is not None else (5 if kind == "newton_schulz" else None),
            lam=_optional_float(numbers.get("lam"), 1.0 if kind == "delta_momentum" else None),
            both=any(isinstance(a, ast.Name) and a.id == "both" for a in call.args),
        )

    def _rate(self, value: ast.Expr, level: str, what: str) -> ir.Rate | None:
        shape = "head"
        if isinstance(value, ast.Per):
            if value.axis.id not in ("head", "channel", "scalar"):
                self.bag.error(
                    "E025",
                    f"`{what}` cannot be `per {value.axis.id}`",
                    value.axis.span,
                    "rates are `per head` (the default), `per channel` or `per scalar`",
                )
            else:
                shape = value.axis.id
            value = value.value
        expr = self._expr(value, level, what)
        if expr is None:
            return None
        width = ir.expr_width(expr)
        if width == "scalar" and ir.is_constant(expr):
            shape = "scalar"
        elif width == "vector" and shape != "channel":
            self.bag.error(
                "E025",
                f"`{what}` is a vector per head (one value per channel), but a {shape} rate is one number",
                value.span,
                "reduce it with `mean(...)`, or say `per channel`",
            )
            return None
        return ir.Rate(expr=expr, shape=shape, span=value.span)  # type: ignore[arg-type]

    # ---- expressions over the level input x
    def _expr(self, e: ast.Expr, level: str, role: str) -> ir.Expr | None:
        counter = [0]
        try:
            return self._expr_rec(e, level, role, counter)
        except _ExprError:
            return None

    def _expr_rec(self, e: ast.Expr, level: str, role: str, counter: list[int]) -> ir.Expr:
        if isinstance(e, ast.Number):
            return self._float32(e.value, e.span)
        if isinstance(e, ast.Name):
            return self._name_expr(e, role)
        if isinstance(e, ast.Neg):
            return ir.Bin(kind="-", left=ir.Const(value=0.0), right=self._expr_rec(e.operand, level, role, counter))
        if isinstance(e, ast.BinOp):
            left = self._expr_rec(e.left, level, role, counter)
            right = self._expr_rec(e.right, level, role, counter)
            return ir.Bin.model_validate({"kind": e.op, "left": left, "right": right})
        if isinstance(e, ast.Pipe):
            out = self._expr_rec(e.value, level, role, counter)
            for stage in e.stages:
                out = self._apply(stage, [out], level, role, counter)
            return out
        if isinstance(e, ast.Call):
            args = [self._expr_rec(a, level, role, counter) for a in e.args]
            return self._apply(e, args, level, role, counter)
        if isinstance(e, ast.Per):
            self._fail(
                "E016", "`per` belongs at the end of a rate (e.g. `lr = sigmoid(linear(x)) per head`)", e.axis.span
            )
        self._fail(
            "E026",
            "this form is not allowed inside a level expression",
            e.span,
            "`->` and lists compose the model and parameters, not projections",
        )
        raise AssertionError  # unreachable: _fail raises

    def _float32(self, value: float, span: Span) -> ir.Const:
        """A constant of an expression: the runtime computes in float32, so it must be finite there."""
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            self._fail("E016", f"the constant {value:g} is not a finite 32-bit float", span, "|c| <= 3.4e38")
        return ir.Const(value=value)

    def _name_expr(self, e: ast.Name, role: str) -> ir.Expr:
        if e.id == "x":
            return ir.Input()
        value = self.local.get(e.id, self.params.get(e.id))
        if isinstance(value, (int, float)):
            return self._float32(float(value), e.span)
        if e.id in ("queries", "keys", "values") and role in ("targets",):
            return ir.RoleRef(role=e.id)  # type: ignore[arg-type]
        if e.id in cat.EXPR_FUNCTIONS:
            self._fail("E015", f"`{e.id}` is a function: write `{e.id}(x)` or `... |> {e.id}`", e.span)
        candidates = {"x", *self.params, *cat.EXPR_FUNCTIONS}
        self._fail("E010", f"unknown name `{e.id}`", e.span, suggest(e.id, candidates) or "the level's input is `x`")
        raise AssertionError

    def _apply(
        self, fn: ast.Name | ast.Call, args: list[ir.Expr], level: str, role: str, counter: list[int]
    ) -> ir.Expr:
        name = fn.id if isinstance(fn, ast.Name) else fn.fn.id
        span = fn.span if isinstance(fn, ast.Name) else fn.fn.span
        kwargs = fn.kwargs if isinstance(fn, ast.Call) else ()
        if name == "linear":
            self._arity(name, args, 1, fn.span, kwargs)
            counter[0] += 1
            return ir.Linear(id=f"{role}_{counter[0] - 1}", arg=args[0])
        if name == "conv":
            call_args = fn.args if isinstance(fn, ast.Call) else ()
            # `conv(4, linear(x))` or `linear(x) |> conv(4)`: the size comes first, the value last.
            size_expr = call_args[0] if call_args else None
            if size_expr is None or len(args) not in (1, 2) or kwargs:
                self._fail("E015", "write `conv(k, expr)` or `expr |> conv(k)`", fn.span)
            assert size_expr is not None
            size = self._positive_int(size_expr, "a convolution width")
            if size is None:
                raise _ExprError
            return ir.Fn(fn="conv", arg=args[-1], size=size)
        if name in cat.EXPR_FUNCTIONS:
            self._arity(name, args, 1, fn.span, kwargs)
            return ir.Fn(fn=name, arg=args[0])
        if self._is_in_context(name):
            return self._read_expr(name, args, kwargs, fn.span)
        if name in self.level_asts:
            self._fail("E027", f"`{name}` has no memory to read", fn.span, "only levels with a `memory` can be read")
        candidates = {"linear", "conv", *cat.EXPR_FUNCTIONS, *(n for n in self.level_asts if self._is_in_context(n))}
        self._fail(
            "E010",
            f"unknown function `{name}`",
            span,
            suggest(name, candidates) or f"functions: {', '.join(sorted(candidates))}",
        )
        raise AssertionError

    def _read_expr(self, name: str, args: list[ir.Expr], kwargs: tuple[ast.Kwarg, ...], span: Span) -> ir.Expr:
        self._arity(name, args, 1, span, ())
        mode = "boundary"  # a level's generated inputs read their producer's boundary state by default
        for kw in kwargs:
            word = kw.value.id if isinstance(kw.value, ast.Name) else None
            if kw.name.id != "read" or word is None:
                self._fail("E015", f"a read of `{name}` takes only `read = online | before | boundary`", kw.span)
            assert isinstance(kw.value, ast.Name)
            found = self._word(kw.value, cat.READ_MODES, "read mode")
            if found is None:
                raise _ExprError
            mode = found
        return ir.Read(level=name, mode=mode, arg=args[0], span=span)  # type: ignore[arg-type]

    def _arity(self, name: str, args: list[ir.Expr], n: int, span: Span, kwargs: tuple[ast.Kwarg, ...]) -> None:
        if len(args) != n:
            self._fail("E015", f"`{name}` takes {n} argument{'s' if n != 1 else ''}, not {len(args)}", span)
        if kwargs:
            self._fail("E015", f"`{name}` takes no keyword arguments", kwargs[0].span)

    def _fail(self, code: str, message: str, span: Span, hint: str | None = None) -> None:
        self.bag.error(code, message, span, hint)
        raise _ExprError

    # ---- calls with keyword arguments (memories, objectives, optimizers)
    def _as_call(self, value: Any, what: str) -> ast.Call | None:
        if isinstance(value, ast.Name):
            return ast.Call(value, (), (), value.span)
        if not isinstance(value, ast.Call):
            self.bag.error("E026", f"{what} is a name with arguments, e.g. `gd(lr = 1)`", value.span)
            return None
        return value

    def _arguments(self, call: ast.Call, sig: cat.Signature) -> dict[str, Any]:
        """Keyword numbers and words, and bare flags, checked against a signature."""
        out: dict[str, Any] = {flag.id: True for flag in self._flags(call, sig)}
        for kw in self._kwargs_only(call, sig.keywords(), sig.flags):
            key = kw.name.id
            if key in sig.names:
                allowed = sig.names[key]
                if not isinstance(kw.value, ast.Name):
                    self.bag.error("E016", f"`{key}` takes a name", kw.value.span)
                elif not allowed:
                    out[key] = kw.value.id  # a level name, checked by the caller
                else:
                    out[key] = self._word(kw.value, allowed, f"`{key}`")
            elif key in sig.numbers:
                out[key] = self._constant(kw.value, f"`{key}`")
        return {k: v for k, v in out.items() if v is not None}

    def _flags(self, call: ast.Call, sig: cat.Signature) -> list[ast.Name]:
        return [a for a in call.args if isinstance(a, ast.Name) and a.id in sig.flags]

    def _kwargs_only(self, call: ast.Call, allowed: set[str], flags: frozenset[str] = frozenset()) -> list[ast.Kwarg]:
        for arg in call.args:
            if isinstance(arg, ast.Name) and arg.id in flags:
                continue
            named = ", ".join(f"`{a} = ...`" for a in sorted(allowed)) or "nothing"
            flag_text = f"; flags: {', '.join(sorted(flags))}" if flags else ""
            self.bag.error(
                "E015", f"`{call.fn.id}` takes keyword arguments only", arg.span, f"it takes {named}{flag_text}"
            )
        seen: set[str] = set()
        out = []
        for kw in call.kwargs:
            if kw.name.id not in allowed:
                hint = suggest(kw.name.id, allowed) or f"its arguments: {', '.join(sorted(allowed)) or 'none'}"
                self.bag.error("E015", f"`{call.fn.id}` has no argument `{kw.name.id}`", kw.name.span, hint)
            elif kw.name.id in seen:
                self.bag.error("E015", f"`{kw.name.id}` is given twice", kw.name.span)
            else:
                seen.add(kw.name.id)
                out.append(kw)
        return out

    # ---- the model composition
    def _model(self) -> ir.Node | None:
        if "model" not in self.bindings:
            self.bag.error(
                "E013",
                f"system `{self.ast.name.id}` has no `model = ...` binding",
                self.ast.name.span,
                "e.g. `model = embed -> block * layers -> rmsnorm -> head`",
            )
            return None
        return self._node(self.bindings["model"].value, stack=("model",))

    def _node(self, e: ast.Expr, stack: tuple[str, ...]) -> ir.Node | None:
        if isinstance(e, ast.Name):
            return self._named_node(e, stack)
        if isinstance(e, ast.Indexed):
            return self._indexed_node(e)
        if isinstance(e, ast.Sequence):
            items = [self._node(i, stack) for i in e.items]
            return ir.SeqNode(items=[i for i in items if i is not None])
        if isinstance(e, ast.BinOp) and e.op == "*":
            return self._product_node(e, stack)
        if isinstance(e, ast.BinOp) and e.op == "+":
            parts = [self._node(e.left, stack), self._node(e.right, stack)]
            if any(p is None for p in parts):
                return None
            return ir.ParallelNode(items=[p for p in parts if p is not None])
        if isinstance(e, ast.Call) and e.fn.id in cat.COMPOSITIONS:
            return self._composition(e, stack)
        if isinstance(e, ast.Call) and e.fn.id in self.level_asts:
            return self._read_site(e)
        self.bag.error(
            "E018",
            "a model is made of layers, levels and compositions",
            e.span,
            "`a -> b`, `residual(...)`, `block * n`, `a + b`, `a * gate(b)`, `prefix(attention, memory)`",
        )
        return None

    def _product_node(self, e: ast.BinOp, stack: tuple[str, ...]) -> ir.Node | None:
        if isinstance(e.right, ast.Call) and e.right.fn.id == "gate":
            value = self._node(e.left, stack)
            gate = self._composition(e.right, stack)
            if value is None or not isinstance(gate, ir.GateNode):
                return None
            return ir.GateNode(value=value, gate=gate.gate)
        body = self._node(e.left, stack)
        if not isinstance(e.right, (ast.Number, ast.Name)):
            self.bag.error("E016", "a repetition count must be a number or a parameter", e.right.span)
            return None
        count = self._positive_int(e.right, "a repetition count")
        if count is not None and count > MAX_REPEAT:  # each copy is a set of modules: refuse a memory bomb early
            self.bag.error("E016", f"a repetition count of {count}", e.right.span, f"at most {MAX_REPEAT} copies")
            return None
        if body is None or count is None:
            return None
        label = e.left.id if isinstance(e.left, ast.Name) else "block"
        return ir.RepeatNode(body=body, count=count, name=label)

    def _composition(self, e: ast.Call, stack: tuple[str, ...]) -> ir.Node | None:
        arity = {"residual": 1, "gate": 1, "prefix": 2}[e.fn.id]
        if len(e.args) != arity or e.kwargs:
            self.bag.error("E015", f"`{e.fn.id}` takes {arity} composition{'s' if arity > 1 else ''}", e.span)
            return None
        parts = [self._node(a, stack) for a in e.args]
        if any(p is None for p in parts):
            return None
        nodes = [p for p in parts if p is not None]
        if e.fn.id == "residual":
            return ir.ResidualNode(body=nodes[0])
        if e.fn.id == "gate":
            return ir.GateNode(value=ir.SeqNode(items=[]), gate=nodes[0])
        return ir.PrefixNode(attention=nodes[0], memory=nodes[1])

    def _read_site(self, e: ast.Call) -> ir.Node | None:
        """`memory(read = boundary, every = 64)`: one more read of a level, at another state; only the
        level's own use (without arguments) feeds its update."""
        use = self._level_use(e.fn)
        if use is None:
            return None
        if e.args:
            self.bag.error("E015", f"a read site of `{e.fn.id}` takes `read = ...` and `every = ...`", e.args[0].span)
            return None
        mode, every = "online", None
        for kw in self._kwargs_only(e, {"read", "every"}):
            if kw.name.id == "read" and isinstance(kw.value, ast.Name):
                mode = self._word(kw.value, cat.READ_MODES, "read mode") or "online"
            elif kw.name.id == "every":
                every = self._positive_int(kw.value, "a read boundary")
            else:
                self.bag.error("E016", "`read` takes `online`, `before` or `boundary`", kw.value.span)
        if every is not None and mode != "boundary":
            self.bag.error("E016", "only a `boundary` read can name a coarser boundary", e.span)
        return ir.LevelNode(level=e.fn.id, span=e.span, read=ir.ReadMode(mode=mode, every=every))  # type: ignore[arg-type]

    def _indexed_node(self, e: ast.Indexed) -> ir.Node | None:
        names = self.range_levels.get(e.name.id)
        if names is None:
            self.bag.error("E010", f"`{e.name.id}` is not a level repeated over a list", e.name.span)
            return None
        if not float(e.index.value).is_integer() or e.index.value >= len(names):  # also 1e999 (inf)
            self.bag.error(
                "E016", f"`{e.name.id}` has {len(names)} levels: index {e.index.text} is out of range", e.span
            )
            return None
        return ir.LevelNode(level=names[int(e.index.value)], span=e.span)

    def _named_node(self, e: ast.Name, stack: tuple[str, ...]) -> ir.Node | None:
        if e.id in self.bindings:
            if e.id in stack:
                self.bag.error("E012", f"binding `{e.id}` refers to itself", e.span)
                return None
            return self._node(self.bindings[e.id].value, (*stack, e.id))
        if e.id in self.range_levels:  # `cms` is the chain cms[0] -> cms[1] -> ...
            return ir.SeqNode(items=[ir.LevelNode(level=n, span=e.span) for n in self.range_levels[e.id]])
        if e.id in self.level_asts:
            return self._level_use(e)
        if e.id in cat.MODEL_LAYERS:
            return ir.LayerNode(kind=e.id, span=e.span)
        candidates = {*self.bindings, *self.level_asts, *cat.MODEL_LAYERS}
        self.bag.error(
            "E010",
            f"unknown layer or level `{e.id}`",
            e.span,
            suggest(e.id, candidates) or f"layers: {', '.join(sorted(cat.MODEL_LAYERS))}",
        )
        return None

    def _level_use(self, e: ast.Name) -> ir.Node | None:
        if not self._is_in_context(e.id):
            self.bag.error(
                "E018",
                f"level `{e.id}` has no memory to read, so it cannot be a layer",
                e.span,
                "only in-context levels (with `memory`) can appear in the model",
            )
            return None
        kind = self._memory_kind(e.id)
        statements = {s.keyword for s in self.level_asts[e.id].statements}
        task = any(
            s.keyword == "objective" and isinstance(s.value, ast.Name) and s.value.id == "task"
            for s in self.level_asts[e.id].statements
        )
        if kind in ("matrix", "kv") and not task and "queries" not in statements:
            self.bag.error(
                "E013",
                f"level `{e.id}` is read as a layer but has no `queries` statement",
                self.level_asts[e.id].name.span,
                "e.g. `queries linear(x) |> l2norm`",
            )
        return ir.LevelNode(level=e.id, span=e.span)


class _NotConstant(Exception):
    def __init__(self, span: Span) -> None:
        self.span = span


def _optional_float(value: float | int | None, default: float | None) -> float | None:
    return float(value) if value is not None else default


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "name"
    return "number"


def _normalise(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def elaborate(
    system: ast.System,
    overrides: Mapping[str, ParamValue] | None = None,
    load_fragment: FragmentLoader | None = None,
) -> ir.System:
    """AST to IR; raises CompileError with every error found."""
    return Elaborator(system, overrides, load_fragment).run()


__all__ = ["CompileError", "elaborate", "suggest"]

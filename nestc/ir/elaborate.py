"""AST to IR: resolve names, parameters and compositions; give every statement its meaning.

Errors are collected (not raised one at a time) so that a file's every mistake is reported in one run.
Kinds resolve through the closed catalogue below, never by importing a name found in a spec.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

from ..diagnostics import CompileError, DiagnosticBag, Span
from ..language import ast
from . import models as ir

# The closed catalogue of names the language knows (one entry per primitive).
MODEL_LAYERS = {"embed", "head", "linear", "rmsnorm", "l2norm"}
EXPR_FUNCTIONS = {"sigmoid", "silu", "softplus", "tanh", "exp", "relu", "l2norm"}
MEMORY_KINDS = {"matrix"}
OBJECTIVE_KINDS = {"dot", "l2"}
INNER_OPTIMIZERS = {"gd": {"lr", "retain"}}
OUTER_OPTIMIZERS = {
    "adamw": {"lr", "weight_decay", "beta1", "beta2", "eps"},
    "sgd": {"lr", "momentum", "weight_decay"},
}
RATE_SHAPES = {"head", "scalar"}
ROLES: tuple[ir.Role, ...] = ("queries", "keys", "values")
IN_CONTEXT_STATEMENTS = {"memory", "queries", "keys", "values", "objective", "decay", "read", "outer gradient"}


def suggest(name: str, candidates: Any) -> str | None:
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


class Elaborator:
    def __init__(self, system: ast.System, overrides: Mapping[str, float] | None = None) -> None:
        self.ast = system
        self.overrides = dict(overrides or {})
        self.bag = DiagnosticBag()
        self.params: dict[str, float | int] = {}
        self.level_asts: dict[str, ast.Level] = {}
        self.bindings: dict[str, ast.Binding] = {}

    # ---- entry point
    def run(self) -> ir.System:
        self._collect_params()
        self._collect_names()
        levels = [lv for lv in (self._level(a) for a in self.level_asts.values()) if lv is not None]
        model = self._model()
        self.bag.raise_if_errors()
        assert model is not None
        return ir.System(name=self.ast.name.id, params=self.params, levels=levels, model=model, span=self.ast.span)

    # ---- parameters
    def _collect_params(self) -> None:
        for param in self.ast.params:
            if param.name.id in self.params:
                self.bag.error("E012", f"parameter `{param.name.id}` is defined twice", param.name.span)
                continue
            value = self._constant(param.default, f"the default of `{param.name.id}`")
            if value is not None:
                self.params[param.name.id] = value
        for name, value in self.overrides.items():
            if name not in self.params:
                hint = suggest(name, self.params) or f"the parameters are: {', '.join(self.params) or 'none'}"
                self.bag.error(
                    "E017", f"`--set {name}=...` names no parameter of `{self.ast.name.id}`", self.ast.name.span, hint
                )
            else:
                self.params[name] = int(value) if float(value).is_integer() else float(value)

    def _constant(self, expr: ast.Expr, what: str) -> float | int | None:
        """Evaluate a parameter expression made of numbers, earlier parameters and arithmetic."""
        try:
            value = self._eval_const(expr)
        except _NotConstant as exc:
            self.bag.error(
                "E016",
                f"{what} must be a number",
                exc.span,
                "parameters are numbers, earlier parameters and + - * / of them",
            )
            return None
        if not math.isfinite(value):
            self.bag.error("E016", f"{what} is not a finite number", expr.span)
            return None
        return int(value) if float(value).is_integer() and abs(value) < 2**53 else value

    def _eval_const(self, expr: ast.Expr) -> float:
        if isinstance(expr, ast.Number):
            return expr.value
        if isinstance(expr, ast.Name) and expr.id in self.params:
            return float(self.params[expr.id])
        if isinstance(expr, ast.Neg):
            return -self._eval_const(expr.operand)
        if isinstance(expr, ast.BinOp):
            left, right = self._eval_const(expr.left), self._eval_const(expr.right)
            if expr.op == "/" and right == 0:
                raise _NotConstant(expr.right.span)
            if expr.op == "+":
                return left + right
            if expr.op == "-":
                return left - right
            return left * right if expr.op == "*" else left / right
        raise _NotConstant(expr.span)

    def _positive_int(self, expr: ast.Number | ast.Name, what: str) -> int | None:
        if isinstance(expr, ast.Name) and expr.id not in self.params:
            self.bag.error("E010", f"unknown name `{expr.id}` in {what}", expr.span, suggest(expr.id, self.params))
            return None
        value = self._constant(expr, what)
        if value is None:
            return None
        if not float(value).is_integer() or value < 1:
            self.bag.error("E016", f"{what} must be a positive integer, not {value}", expr.span)
            return None
        return int(value)

    # ---- names
    def _collect_names(self) -> None:
        for item in self.ast.items:
            name = item.name.id
            if name in self.level_asts or name in self.bindings:
                self.bag.error("E012", f"`{name}` is defined twice", item.name.span)
            elif isinstance(item, ast.Level):
                self.level_asts[name] = item
            else:
                self.bindings[name] = item
            if name in self.params:
                self.bag.error(
                    "E012", f"`{name}` is both a parameter and a {type(item).__name__.lower()}", item.name.span
                )

    # ---- levels
    def _level(self, level: ast.Level) -> ir.Level | None:
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
            return self._in_context_level(level, stmts, owner, update, spans)
        return self._outer_level(level, stmts, owner, update, spans)

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

    def _outer_level(
        self,
        level: ast.Level,
        stmts: dict[str, ast.Statement],
        owner: str | None,
        update: ir.Frequency,
        spans: dict[str, Span],
    ) -> ir.Level | None:
        for key in IN_CONTEXT_STATEMENTS & stmts.keys():
            self.bag.error(
                "E013",
                f"`{key}` needs a `memory` statement in level `{level.name.id}`",
                stmts[key].span,
                "an in-context level says `memory matrix per head`",
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
        return ir.Level(name=level.name.id, owner=owner, update=update, outer=outer, span=level.span, spans=spans)

    def _outer_optimizer(self, stmt: ast.Statement) -> ir.OuterOptimizer | None:
        call = self._as_call(stmt.value, "an optimizer")
        if call is None:
            return None
        if call.fn.id not in OUTER_OPTIMIZERS:
            hint = suggest(call.fn.id, OUTER_OPTIMIZERS) or f"outer optimizers: {', '.join(OUTER_OPTIMIZERS)}"
            if call.fn.id in INNER_OPTIMIZERS:
                hint = f"`{call.fn.id}` is an inner optimizer: it needs a `memory` in this level"
            self.bag.error("E011", f"unknown outer optimizer `{call.fn.id}`", call.fn.span, hint)
            return None
        hyper: dict[str, float] = {}
        for kw in self._kwargs_only(call, OUTER_OPTIMIZERS[call.fn.id]):
            value = self._constant(kw.value, f"`{kw.name.id}`")
            if value is not None:
                hyper[kw.name.id] = float(value)
        return ir.OuterOptimizer(kind=call.fn.id, hyper=hyper)  # type: ignore[arg-type]

    def _in_context_level(
        self,
        level: ast.Level,
        stmts: dict[str, ast.Statement],
        owner: str | None,
        update: ir.Frequency,
        spans: dict[str, Span],
    ) -> ir.Level | None:
        name = level.name.id
        memory = self._memory(stmts["memory"])
        roles: dict[ir.Role, ir.Expr] = {}
        for role in ROLES:
            if role in stmts:
                value = stmts[role].value
                assert not isinstance(value, (ast.Frequency, ast.GradientMode))
                expr = self._expr(value, name, role, allow_per=False)
                if expr is not None:
                    roles[role] = expr
            elif role != "queries":
                self.bag.error(
                    "E013", f"level `{name}` has no `{role}` statement", level.name.span, f"e.g. `{role} linear(x)`"
                )
        objective = self._objective(stmts.get("objective"), level)
        inner = self._inner_optimizer(stmts.get("optimizer"), level, stmts.get("decay"))
        if update.unit != "token":
            self.bag.error(
                "E016",
                f"in-context level `{name}` must update in tokens, not `{update.describe()}`",
                stmts["update"].span if "update" in stmts else level.name.span,
                "e.g. `update every token` or `update every 16 tokens`",
            )
        read = ir.ReadMode(mode=self._name_value(stmts.get("read"), "online"))  # type: ignore[arg-type]
        gradient = self._gradient(stmts.get("outer gradient"))
        if memory is None or objective is None or inner is None:
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
            span=level.span,
            spans=spans,
        )

    def _name_value(self, stmt: ast.Statement | None, default: str) -> str:
        if stmt is None:
            return default
        assert isinstance(stmt.value, ast.Name)
        return stmt.value.id

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
        if not isinstance(value, ast.Name) or value.id not in MEMORY_KINDS:
            word = value.id if isinstance(value, ast.Name) else "this"
            self.bag.error(
                "E011",
                f"unknown memory kind `{word}`",
                value.span,  # type: ignore[union-attr]
                suggest(word, MEMORY_KINDS) or f"memories: {', '.join(sorted(MEMORY_KINDS))}",
            )
            return None
        return ir.Memory(kind=value.id, per_head=per_head)  # type: ignore[arg-type]

    def _objective(self, stmt: ast.Statement | None, level: ast.Level) -> ir.Objective | None:
        name = level.name.id
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
        if call.fn.id not in OBJECTIVE_KINDS:
            self.bag.error(
                "E011",
                f"unknown objective `{call.fn.id}`",
                call.fn.span,
                suggest(call.fn.id, OBJECTIVE_KINDS) or f"objectives: {', '.join(sorted(OBJECTIVE_KINDS))}",
            )
            return None
        expected = f"{call.fn.id}({name}(keys), values)"
        args = call.args
        ok = (
            len(args) == 2
            and not call.kwargs
            and isinstance(args[0], ast.Call)
            and args[0].fn.id == name
            and len(args[0].args) == 1
            and isinstance(args[0].args[0], ast.Name)
            and args[0].args[0].id == "keys"
            and isinstance(args[1], ast.Name)
            and args[1].id == "values"
        )
        if not ok:
            self.bag.error(
                "E026",
                "the objective must compare this level's memory of its keys with its values",
                call.span,
                f"write `{expected}`",
            )
            return None
        return ir.Objective(kind=call.fn.id)  # type: ignore[arg-type]

    def _inner_optimizer(
        self, stmt: ast.Statement | None, level: ast.Level, decay: ast.Statement | None
    ) -> ir.InnerOptimizer | None:
        name = level.name.id
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
        if call.fn.id not in INNER_OPTIMIZERS:
            hint = suggest(call.fn.id, INNER_OPTIMIZERS) or f"inner optimizers: {', '.join(INNER_OPTIMIZERS)}"
            if call.fn.id in OUTER_OPTIMIZERS:
                hint = f"`{call.fn.id}` is an outer optimizer; an in-context memory uses e.g. `gd`"
            self.bag.error("E011", f"unknown inner optimizer `{call.fn.id}`", call.fn.span, hint)
            return None
        rates: dict[str, ir.Rate] = {}
        for kw in self._kwargs_only(call, INNER_OPTIMIZERS[call.fn.id]):
            rate = self._rate(kw.value, name, kw.name.id)
            if rate is not None:
                rates[kw.name.id] = rate
        for missing in sorted(INNER_OPTIMIZERS[call.fn.id] - {kw.name.id for kw in call.kwargs}):
            default = {"retain": 1.0}.get(missing)
            if default is None:
                self.bag.error("E015", f"`{call.fn.id}` needs `{missing} = ...`", call.span)
            else:
                rates[missing] = ir.Rate(expr=ir.Const(value=default), shape="scalar")
        if len(rates) != len(INNER_OPTIMIZERS[call.fn.id]):
            return None
        decay_mode = self._name_value(decay, "after")
        return ir.InnerOptimizer(kind="gd", lr=rates["lr"], retain=rates["retain"], decay=decay_mode)  # type: ignore[arg-type]

    def _rate(self, value: ast.Expr, level: str, what: str) -> ir.Rate | None:
        shape = "head"
        if isinstance(value, ast.Per):
            if value.axis.id not in RATE_SHAPES:
                self.bag.error(
                    "E025",
                    f"`{what}` cannot be `per {value.axis.id}` for a `gd` matrix memory",
                    value.axis.span,
                    "rates here are `per head` (the default) or `per scalar`",
                )
            shape = value.axis.id
            value = value.value
        expr = self._expr(value, level, what, allow_per=False)
        if expr is None:
            return None
        if ir.is_constant(expr):
            shape = "scalar"
        return ir.Rate(expr=expr, shape=shape)  # type: ignore[arg-type]

    # ---- expressions over the level input x
    def _expr(self, e: ast.Expr, level: str, role: str, *, allow_per: bool) -> ir.Expr | None:
        counter = [0]
        try:
            return self._expr_rec(e, level, role, counter)
        except _ExprError:
            return None

    def _expr_rec(self, e: ast.Expr, level: str, role: str, counter: list[int]) -> ir.Expr:
        if isinstance(e, ast.Number):
            return ir.Const(value=e.value)
        if isinstance(e, ast.Name):
            if e.id == "x":
                return ir.Input()
            if e.id in self.params:
                return ir.Const(value=float(self.params[e.id]))
            if e.id in EXPR_FUNCTIONS:
                self._fail("E015", f"`{e.id}` is a function: write `{e.id}(x)` or `... |> {e.id}`", e.span)
            self._fail(
                "E010",
                f"unknown name `{e.id}`",
                e.span,
                suggest(e.id, {"x", *self.params, *EXPR_FUNCTIONS}) or "the level's input is `x`",
            )
        if isinstance(e, ast.Neg):
            return ir.Bin(kind="-", left=ir.Const(value=0.0), right=self._expr_rec(e.operand, level, role, counter))
        if isinstance(e, ast.BinOp):
            return ir.Bin.model_validate(
                {
                    "kind": e.op,
                    "left": self._expr_rec(e.left, level, role, counter),
                    "right": self._expr_rec(e.right, level, role, counter),
                }
            )
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
            "this form is not allowed inside an expression",
            e.span,
            "`->` composes layers in the model, not inside a level",
        )
        raise AssertionError  # unreachable: _fail raises

    def _apply(
        self, fn: ast.Name | ast.Call, args: list[ir.Expr], level: str, role: str, counter: list[int]
    ) -> ir.Expr:
        name = fn.id if isinstance(fn, ast.Name) else fn.fn.id
        span = fn.span
        kwargs = fn.kwargs if isinstance(fn, ast.Call) else ()
        if name == "linear":
            self._arity(name, args, 1, span)
            counter[0] += 1
            return ir.Linear(id=f"{role}_{counter[0] - 1}", arg=args[0])
        if name in EXPR_FUNCTIONS:
            self._arity(name, args, 1, span)
            if kwargs:
                self._fail("E015", f"`{name}` takes no keyword arguments", kwargs[0].span)
            return ir.Fn(fn=name, arg=args[0])
        if name in self.level_asts:
            self._arity(name, args, 1, span)
            mode = "boundary"
            for kw in kwargs:
                if (
                    kw.name.id != "read"
                    or not isinstance(kw.value, ast.Name)
                    or kw.value.id not in ("online", "before", "boundary")
                ):
                    self._fail("E015", f"a read of `{name}` takes only `read = online | before | boundary`", kw.span)
                mode = kw.value.id  # type: ignore[union-attr]
            return ir.Read(level=name, mode=mode, arg=args[0], span=span)  # type: ignore[arg-type]
        candidates = {"linear", *EXPR_FUNCTIONS, *self.level_asts}
        self._fail(
            "E010",
            f"unknown function `{name}`",
            fn.span if isinstance(fn, ast.Name) else fn.fn.span,
            suggest(name, candidates) or f"functions: {', '.join(sorted(candidates))}",
        )
        raise AssertionError

    def _arity(self, name: str, args: list[ir.Expr], n: int, span: Span) -> None:
        if len(args) != n:
            self._fail("E015", f"`{name}` takes {n} argument{'s' if n != 1 else ''}, not {len(args)}", span)

    def _fail(self, code: str, message: str, span: Span, hint: str | None = None) -> None:
        self.bag.error(code, message, span, hint)
        raise _ExprError

    def _as_call(self, value: Any, what: str) -> ast.Call | None:
        if isinstance(value, ast.Name):
            return ast.Call(value, (), (), value.span)
        if not isinstance(value, ast.Call):
            self.bag.error("E026", f"{what} is a name with arguments, e.g. `gd(lr = 1)`", value.span)
            return None
        return value

    def _kwargs_only(self, call: ast.Call, allowed: set[str]) -> list[ast.Kwarg]:
        for arg in call.args:
            self.bag.error(
                "E015",
                f"`{call.fn.id}` takes keyword arguments only",
                arg.span,
                f"name it: {', '.join(f'`{a} = ...`' for a in sorted(allowed))}",
            )
        seen: set[str] = set()
        out = []
        for kw in call.kwargs:
            if kw.name.id not in allowed:
                self.bag.error(
                    "E015",
                    f"`{call.fn.id}` has no argument `{kw.name.id}`",
                    kw.name.span,
                    suggest(kw.name.id, allowed) or f"its arguments: {', '.join(sorted(allowed))}",
                )
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
        if isinstance(e, ast.Sequence):
            items = [self._node(i, stack) for i in e.items]
            return ir.SeqNode(items=[i for i in items if i is not None])
        if isinstance(e, ast.BinOp) and e.op == "*":
            body = self._node(e.left, stack)
            count = (
                self._positive_int(e.right, "a repetition count")
                if isinstance(e.right, (ast.Number, ast.Name))
                else None
            )
            if count is None and not isinstance(e.right, (ast.Number, ast.Name)):
                self.bag.error("E016", "a repetition count must be a number or a parameter", e.right.span)
            if body is None or count is None:
                return None
            label = e.left.id if isinstance(e.left, ast.Name) else "block"
            return ir.RepeatNode(body=body, count=count, name=label)
        if isinstance(e, ast.Call) and e.fn.id == "residual":
            if len(e.args) != 1 or e.kwargs:
                self.bag.error("E015", "`residual` takes one composition", e.span)
                return None
            body = self._node(e.args[0], stack)
            return ir.ResidualNode(body=body) if body is not None else None
        self.bag.error(
            "E018",
            "a model is made of layers, levels, `->`, `residual(...)` and `block * n`",
            e.span,
            "compositions: `a -> b`, `residual(norm -> level)`, `block * layers`",
        )
        return None

    def _named_node(self, e: ast.Name, stack: tuple[str, ...]) -> ir.Node | None:
        if e.id in self.bindings:
            if e.id in stack:
                self.bag.error("E012", f"binding `{e.id}` refers to itself", e.span)
                return None
            return self._node(self.bindings[e.id].value, (*stack, e.id))
        if e.id in self.level_asts:
            if not any(s.keyword == "memory" for s in self.level_asts[e.id].statements):
                self.bag.error(
                    "E018",
                    f"level `{e.id}` has no memory to read, so it cannot be a layer",
                    e.span,
                    "only in-context levels (with `memory`) can appear in the model",
                )
                return None
            if not any(s.keyword == "queries" for s in self.level_asts[e.id].statements):
                self.bag.error(
                    "E013",
                    f"level `{e.id}` is read as a layer but has no `queries` statement",
                    self.level_asts[e.id].name.span,
                    "e.g. `queries linear(x) |> l2norm`",
                )
            return ir.LevelNode(level=e.id, span=e.span)
        if e.id in MODEL_LAYERS:
            return ir.LayerNode(kind=e.id, span=e.span)
        candidates = {*self.bindings, *self.level_asts, *MODEL_LAYERS}
        self.bag.error(
            "E010",
            f"unknown layer or level `{e.id}`",
            e.span,
            suggest(e.id, candidates) or f"layers: {', '.join(sorted(MODEL_LAYERS))}",
        )
        return None


class _NotConstant(Exception):
    def __init__(self, span: Span) -> None:
        self.span = span


class _ExprError(Exception):
    pass


def elaborate(system: ast.System, overrides: Mapping[str, float] | None = None) -> ir.System:
    """AST to IR; raises CompileError with every error found."""
    return Elaborator(system, overrides).run()


__all__ = ["elaborate", "CompileError"]

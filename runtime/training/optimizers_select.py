"""Which outer optimizer level trains which parameter: `params` selectors resolved on a built model.

Every parameter has a category:
- `embeddings`: the token embedding and the output head (the maps to and from the vocabulary);
- `gains`: the scales of rmsnorm and layernorm (and any other vector that is not a bias);
- `biases`: biases (layernorm, convolutions);
- `states`: the initial states and persistent tokens of in-context levels (parameters of the level itself);
- `matrices`: every other weight of two or more axes (projections, MLPs, rate maps, convolution kernels).
A parameter of an in-context level goes, in this order of precedence, to the optimizer level that names that
level in `params`; to the level's owner (`in OWNER`) when the owner selects nothing or selects its category;
to a level whose selectors include its category (`all` includes every one); to the default owner. Exactly one
group gets each parameter (rule 3); a parameter no group takes is an error, not silently frozen.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import RuntimeInputError
from ..layers import Embed, Head, RMSNorm
from ..levels import Level
from ..ops.sequence_layers import LayerNorm
from ..plan import OptimizerGroupPlan

CATEGORIES = ("matrices", "embeddings", "gains", "biases", "states")


def parameter_categories(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its category."""
    found: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, (Embed, Head)):
            for param in module.parameters():
                found.setdefault(id(param), "embeddings")
        elif isinstance(module, (RMSNorm, LayerNorm)):
            for name, param in module.named_parameters(recurse=False):
                found.setdefault(id(param), "biases" if name == "bias" else "gains")
        elif isinstance(module, Level):
            for param in module.parameters(recurse=False):
                found.setdefault(id(param), "states")
    for name, param in model.named_parameters():
        if id(param) not in found:
            found[id(param)] = _by_shape(name, param)
    return found


def _by_shape(name: str, param: nn.Parameter) -> str:
    if name.rsplit(".", 1)[-1] == "bias":
        return "biases"
    return "matrices" if param.dim() >= 2 else "gains"


def _categories(group: OptimizerGroupPlan) -> set[str]:
    chosen = {s for s in group.selectors if s in CATEGORIES}
    return set(CATEGORIES) if "all" in group.selectors else chosen


def assign_parameters(
    model: nn.Module, groups: list[OptimizerGroupPlan], levels: dict[str, Level]
) -> dict[str, list[nn.Parameter]]:
    """Group name -> its parameters, in the model's parameter order."""
    category = parameter_categories(model)
    level_of = {id(p): level.plan.name for level in levels.values() for p in level.parameters()}
    by_name = {g.name: g for g in groups}
    out: dict[str, list[nn.Parameter]] = {g.name: [] for g in groups}
    for name, param in model.named_parameters():
        group = _group_for(category[id(param)], level_of.get(id(param)), groups)
        if group is None:
            raise RuntimeInputError(
                f"parameter `{name}` ({category[id(param)]}) is trained by no optimizer level",
                hint=f"add `{category[id(param)]}` to a `params` selector, or use `params all` on one level",
            )
        out[by_name[group].name].append(param)
    return out


def _group_for(category: str, level: str | None, groups: list[OptimizerGroupPlan]) -> str | None:
    if level is not None:
        for group in groups:
            if level in group.selectors:
                return group.name
        for group in groups:
            if level in group.owns_levels and (not _categories(group) or category in _categories(group)):
                return group.name
    for group in groups:
        if category in _categories(group):
            return group.name
    return next((g.name for g in groups if g.default), None)


def group_dicts(model: nn.Module, groups: list[OptimizerGroupPlan], levels: dict[str, Level]) -> list[dict[str, Any]]:
    """The groups `build_optimizers` takes: name, kind, params, the level's hyper-parameters, its cadence and
    (for `sgd` with a gradient-memory level) the memory. Frozen levels and empty groups are left out."""
    params = assign_parameters(model, groups, levels)
    out = []
    for group in groups:
        if not params[group.name] or group.every_steps < 1:
            continue
        entry: dict[str, Any] = {"name": group.name, "kind": group.kind, "params": params[group.name]}
        entry.update(group.hyper)
        if group.every_steps > 1:
            entry["every"] = group.every_steps
        if group.memory is not None:
            entry["memory"] = dict(group.memory)
        out.append(entry)
    return out

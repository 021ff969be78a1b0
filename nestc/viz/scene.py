"""Renderer-independent drawings: a `Scene` of rectangles, texts and paths in pixels, laid out from a
`VizModel`. svg.py and png.py draw the same scene, so the SVG and the PNG show the same picture.

Hierarchy view: one horizontal band per update frequency (fastest on top); a level's card sits in its
band; a level's box encloses the boxes of the levels it owns (rule 2), so an owner's box reaches up to
its fastest descendant; repeated blocks (`block[0]`, `block[1]`) are boxes inside the owner's box.
Gradient view: one row per level instance, grouped by the level that trains its parameters; parameters
on the left, the memory state θ in the middle with its objective (inner gradient), and on the right the
quantities it consumes, each fed by a bus from the level that generates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import Card, VizModel

FONT = "DejaVu Sans Mono"
CHAR = 0.602  # DejaVu Sans Mono advance, in ems
KIND_FILL = {
    "matrix": "#e3f2e1",
    "mlp": "#e1ecf7",
    "kv": "#fdf3d8",
    "persistent": "#ececec",
    "optimizer": "#efe4f6",
    "gradients": "#f6e4ee",  # a gradient memory: an optimizer's state, drawn as a memory
}
KIND_STROKE = {
    "matrix": "#4c8c4a",
    "mlp": "#3f6fa8",
    "kv": "#b08a22",
    "persistent": "#777777",
    "optimizer": "#7b4f9d",
    "gradients": "#9d4f7b",
}
MODE_STYLE = {  # outer-gradient modes: (colour, dash)
    "through": ("#2e6db4", None),
    "truncate": ("#d07a12", "7,4"),
    "stop": ("#9a9a9a", "2,3"),
    "read": ("#555555", None),
}
READ_COLOUR = {"online": "#c0392b", "before": "#8e44ad", "boundary": "#16866f"}
INNER = "#e67e22"
WARN = "#c62828"
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#ff7f0e"]


def text_width(text: str, size: float) -> float:
    return len(text) * size * CHAR


@dataclass
class Rect:
    x: float
    y: float
    w: float
    h: float
    fill: str = "none"
    stroke: str = "#333333"
    width: float = 1.0
    dash: str | None = None
    rx: float = 4.0


@dataclass
class Text:
    x: float
    y: float  # baseline
    text: str
    size: float = 11.0
    color: str = "#222222"
    weight: str = "normal"
    anchor: str = "start"  # start, middle, end


@dataclass
class Path:
    points: list[tuple[float, float]]
    stroke: str = "#333333"
    width: float = 1.2
    dash: str | None = None
    arrow: bool = False


@dataclass
class Dot:
    x: float
    y: float
    r: float
    fill: str


Shape = Rect | Text | Path | Dot


@dataclass
class Group:
    """Shapes that belong to one thing: a level card (`level`, linked to `href`), a container, an edge."""

    cls: str
    shapes: list[Shape | Group] = field(default_factory=list)
    href: str | None = None
    title: str | None = None
    data: dict[str, str] = field(default_factory=dict)

    def add(self, item: Shape | Group) -> None:
        self.shapes.append(item)


@dataclass
class Scene:
    width: float
    height: float
    root: Group


def _dash(mode: str) -> tuple[str, str | None]:
    return MODE_STYLE.get(mode.split()[0], MODE_STYLE["through"])


# ---- hierarchy ---------------------------------------------------------------------------------------------

CARD_H = 66.0
LINE = 14.0
SIZE = 11.0
HEAD = 20.0  # room above a container's content for its title
PAD = 9.0  # room around a container's content
HGAP = 14.0
AXIS_W = 150.0


@dataclass
class _Item:
    """A card or a container of items, measured in bands."""

    card: Card | None = None
    title: str = ""
    cls: str = ""
    items: list[_Item] = field(default_factory=list)
    data: dict[str, str] = field(default_factory=dict)
    stroke: str = "#888888"
    fill: str = "none"
    dash: str | None = None
    # measured
    top: int = 0
    bottom: int = 0
    w: float = 0.0
    ext_top: float = 0.0
    ext_bottom: float = 0.0
    columns: list[list[_Item]] = field(default_factory=list)
    rank: int = 0


def _card_lines(card: Card) -> list[str]:
    what = []
    if card.objective != "-":
        what.append(f"objective {card.objective}")
    if card.optimizer != "-":
        what.append(card.optimizer)
    when = [card.frequency] + ([f"read {card.read}"] if card.read != "-" else [])
    if card.gradient not in ("-",):
        when.append(card.gradient)
    return [card.memory if card.memory != "-" else "optimizer level", " · ".join(what) or "-", " · ".join(when)]


def _card_width(card: Card) -> float:
    name_w = text_width(card.name, SIZE + 1) + 50
    return max([name_w] + [text_width(t, SIZE - 1) for t in _card_lines(card)]) + 16


def _tree(model: VizModel) -> list[_Item]:
    children: dict[str | None, list[Card]] = {}
    for card in model.cards:
        children.setdefault(card.owner, []).append(card)

    def build(card: Card, within: tuple[str | None, int | None]) -> _Item:
        item = _Item(card=card, rank=card.rank)
        kids = children.get(card.name, [])
        if not kids:
            return item
        kind = card.kind
        return _Item(
            title=f"{card.name} trains:",
            cls="owner",
            items=[item, *grouped(kids, within)],
            data={"owner": card.name},
            stroke=KIND_STROKE[kind],
            rank=card.rank,
        )

    def grouped(cards: list[Card], within: tuple[str | None, int | None]) -> list[_Item]:
        out: list[_Item] = []
        groups: dict[str, dict[int, list[Card]]] = {}
        for card in cards:
            if card.group is None or card.group == within[0]:
                out.append(build(card, within))
            else:
                groups.setdefault(card.group, {}).setdefault(card.index or 0, []).append(card)
        for group, by_index in groups.items():
            blocks = [
                _Item(
                    title=f"{group}[{index}]",
                    cls="block",
                    items=[build(c, (group, index)) for c in members],
                    data={"group": group, "index": str(index)},
                    stroke="#9aa5b1",
                    dash="5,3",
                    rank=min(c.rank for c in members),
                )
                for index, members in sorted(by_index.items())
            ]
            out.append(
                _Item(
                    title=f"{group} × {len(blocks)}  (repeated block)",
                    cls="group",
                    items=blocks,
                    data={"group": group},
                    stroke="#6b7785",
                    fill="#fafbfc",
                    rank=min(b.rank for b in blocks),
                )
            )
        return out

    return grouped(children.get(None, []), (None, None))


def _measure(item: _Item) -> None:
    if item.card is not None:
        item.top = item.bottom = item.card.band
        item.w = 0.0  # set by the caller (uniform card width)
        return
    for child in item.items:
        _measure(child)
    item.top = min(c.top for c in item.items)
    item.bottom = max(c.bottom for c in item.items)
    item.ext_top = HEAD + PAD + max(c.ext_top for c in item.items if c.top == item.top)
    item.ext_bottom = PAD + max(c.ext_bottom for c in item.items if c.bottom == item.bottom)


def _pack(items: list[_Item], card_w: float) -> tuple[list[list[_Item]], float]:
    """First-fit columns: items whose band ranges do not overlap share a column (faster first)."""
    columns: list[list[_Item]] = []
    for item in sorted(items, key=lambda i: (i.top, i.rank)):
        for column in columns:
            if all(item.top > o.bottom or o.top > item.bottom for o in column):
                column.append(item)
                break
        else:
            columns.append([item])
    widths = [max(_width(i, card_w) for i in column) for column in columns]
    return columns, sum(widths) + HGAP * (len(widths) - 1)


def _width(item: _Item, card_w: float) -> float:
    if item.card is not None:
        return card_w
    if not item.columns:
        item.columns, inner = _pack(item.items, card_w)
        item.w = max(inner, text_width(item.title, SIZE) + 8) + 2 * PAD
    return item.w


def hierarchy(model: VizModel, y0: float = 0.0, title: str = "") -> tuple[Group, float, float]:
    """The hierarchy view as a group, its width and height."""
    card_w = max((_card_width(c) for c in model.cards), default=200.0)
    roots = _tree(model)
    for item in roots:
        _measure(item)
    items = _walk(roots)
    n = len(model.bands)
    above = [max([0.0, *(i.ext_top for i in items if i.top == b)]) for b in range(n)]
    below = [max([0.0, *(i.ext_bottom for i in items if i.bottom == b)]) for b in range(n)]
    ext_bottom = below[-1] if below else 0.0
    top = y0 + 34 + (18 if title else 0)
    band_y: list[float] = []
    y = top
    for b in range(n):
        y += above[b]
        band_y.append(y)
        y += CARD_H + below[b] + 16
    columns, total_w = _pack(roots, card_w)

    group = Group("view hierarchy", data={"view": "hierarchy"})
    width = AXIS_W + total_w + 30
    height = (band_y[-1] + CARD_H + ext_bottom + 60 - y0) if band_y else 80.0
    if title:
        group.add(Text(12, y0 + 22, title, 15, weight="bold"))
    # the frequency axis
    axis = Group("axis")
    for i, band in enumerate(model.bands):
        y = band_y[i] + CARD_H / 2
        axis.add(Path([(AXIS_W - 12, y), (width - 10, y)], "#dde3ea", 1.0, "3,4"))
        axis.add(Text(AXIS_W - 18, y + 4, band, SIZE, "#34495e", "bold", "end"))
    if band_y:
        ax_x = 14.0
        axis.add(Path([(ax_x, band_y[-1] + CARD_H / 2), (ax_x, band_y[0])], "#34495e", 1.6, arrow=True))
        axis.add(Text(ax_x + 6, band_y[0] - 8, "faster (≻)", SIZE - 1, "#34495e"))
        axis.add(Text(ax_x + 6, band_y[-1] + CARD_H + 14, "slower", SIZE - 1, "#34495e"))
    group.add(axis)

    def place(item: _Item, x: float) -> Group:
        if item.card is not None:
            return _card(item.card, x, band_y[item.card.band], card_w)
        y1 = band_y[item.top] - item.ext_top
        y2 = band_y[item.bottom] + CARD_H + item.ext_bottom
        g = Group(item.cls, data=item.data)
        g.add(Rect(x, y1, item.w, y2 - y1, item.fill, item.stroke, 1.3, item.dash, 8))
        g.add(Text(x + PAD, y1 + 15, item.title, SIZE, item.stroke, "bold"))
        cx = x + PAD
        for column in item.columns:
            for child in column:
                g.add(place(child, cx))
            cx += max(_width(c, card_w) for c in column) + HGAP
        return g

    x = AXIS_W
    for column in columns:
        for item in column:
            group.add(place(item, x))
        x += max(_width(c, card_w) for c in column) + HGAP
    legend_y = y0 + height - 26
    _hierarchy_legend(group, AXIS_W, legend_y)
    return group, max(width, 900.0), height


def _walk(items: list[_Item]) -> list[_Item]:
    out = []
    for item in items:
        out.append(item)
        out.extend(_walk(item.items))
    return out


def _card(card: Card, x: float, y: float, w: float) -> Group:
    g = Group("level", href=None, title=f"{card.name}: {card.level}", data={"instance": card.name})
    fill, stroke = KIND_FILL[card.kind], KIND_STROKE[card.kind]
    g.add(Rect(x, y, w, CARD_H, fill, WARN if card.warned else stroke, 2.0 if card.warned else 1.4, None, 6))
    g.add(Text(x + 8, y + 16, card.name, SIZE + 1, "#111111", "bold"))
    g.add(Text(x + w - 8, y + 15, f"≻{card.rank + 1}", SIZE - 1, stroke, "bold", "end"))
    for i, line in enumerate(_card_lines(card)):
        g.add(Text(x + 8, y + 16 + LINE * (i + 1), line, SIZE - 1, "#333333"))
    if card.warned:
        g.add(Text(x + w - 8, y + CARD_H - 5, "⚠ W001", SIZE - 1, WARN, "bold", "end"))
    return g


def _hierarchy_legend(group: Group, x: float, y: float) -> None:
    legend = Group("legend")
    for kind in ("matrix", "mlp", "kv", "persistent", "optimizer"):
        legend.add(Rect(x, y - 10, 14, 12, KIND_FILL[kind], KIND_STROKE[kind], 1.2, None, 2))
        legend.add(Text(x + 18, y, kind if kind != "optimizer" else "optimizer level", SIZE - 1))
        x += 28 + text_width(kind if kind != "optimizer" else "optimizer level", SIZE - 1)
    legend.add(
        Text(x + 6, y, "box in box: `level B in A` (A trains B) · ≻n: rank in the speed order", SIZE - 1, "#555555")
    )
    group.add(legend)


# ---- gradient flow ------------------------------------------------------------------------------------------

CHIP_H = 18.0
CHIP_GAP = 4.0
THETA_W = 190.0
THETA_H = 40.0
LANE = 12.0


def gradients(model: VizModel, y0: float = 0.0, title: str = "") -> tuple[Group, float, float]:
    """The gradient-flow view as a group, its width and height."""
    cards = {c.name: c for c in model.cards}
    params_of: dict[str, list] = {}
    for p in model.params:
        params_of.setdefault(p.instance, []).append(p)
    inputs_of: dict[str, list] = {}
    for e in model.edges:
        if e.kind == "generated":
            inputs_of.setdefault(e.dst, []).append(e)
    outer = {(e.src, e.dst): e for e in model.edges if e.kind == "outer"}
    inner = {e.dst: e for e in model.edges if e.kind == "inner"}

    # Rows: each trainer's own row (its layers), then the instances it trains, fast first, block by block.
    trainers = model.trainers()
    rows: list[tuple[str, str]] = []  # (trainer, instance)
    for trainer in trainers:
        trained = [c for c in model.cards if (c.owner or c.name) == trainer and c.name != trainer]
        trained.sort(key=lambda c: (c.group or "", c.index or 0, c.rank, c.name))
        if params_of.get(trainer) and cards[trainer].kind == "optimizer":
            rows.append((trainer, trainer))
        rows.extend((trainer, c.name) for c in trained)
    # widths
    chip_w = max([150.0, *(text_width(p.label, SIZE - 1) + 34 for p in model.params)])
    in_w = max([150.0, *(text_width(f"{e.role} ← {e.src} · {e.mode}", SIZE - 1) + 16 for e in model.edges)])
    obj_w = max([60.0, *(text_width(e.label, SIZE - 1) + 14 for e in inner.values())])
    x_cluster = 12.0
    x_chip = x_cluster + PAD
    x_theta = x_chip + chip_w + 110
    x_obj = x_theta + THETA_W + 34
    # lanes: one per producer, reused where their row spans do not overlap
    row_of = {inst: i for i, (_, inst) in enumerate(rows)}
    producers: dict[str, list] = {}
    for e in model.edges:
        if e.kind == "generated" and e.src in row_of and e.dst in row_of:
            producers.setdefault(e.src, []).append(e)
    spans = {
        p: (min([row_of[p], *(row_of[e.dst] for e in es)]), max([row_of[p], *(row_of[e.dst] for e in es)]))
        for p, es in producers.items()
    }
    lanes: list[list[tuple[int, int]]] = []
    lane_of: dict[str, int] = {}
    for producer_name in sorted(spans, key=lambda n: (spans[n][0], row_of[n])):
        a, b = spans[producer_name]
        for i, used in enumerate(lanes):
            if all(b < u0 or a > u1 for u0, u1 in used):
                used.append((a, b))
                lane_of[producer_name] = i
                break
        else:
            lane_of[producer_name] = len(lanes)
            lanes.append([(a, b)])
    x_lanes = x_obj + obj_w + 20
    x_in = x_lanes + LANE * max(1, len(lanes)) + 24
    width = x_in + in_w + 20

    # rows' heights
    top = y0 + 34 + (18 if title else 0)
    row_y: list[float] = []
    y = top + HEAD + PAD
    prev_trainer = None
    for trainer, inst in rows:
        if prev_trainer is not None and trainer != prev_trainer:
            y += 2 * PAD + HEAD + 10
        prev_trainer = trainer
        n = max(len(params_of.get(inst, [])), len(inputs_of.get(inst, [])), 2)
        row_y.append(y)
        y += n * (CHIP_H + CHIP_GAP) + 14
    height = y + PAD + 96 - y0

    group = Group("view gradients", data={"view": "gradients"})
    if title:
        group.add(Text(12, y0 + 22, title, 15, weight="bold"))
    # clusters: the parameters of one trainer
    for trainer in trainers:
        idx = [i for i, (t, _) in enumerate(rows) if t == trainer]
        if not idx:
            continue
        y1 = row_y[idx[0]] - HEAD - PAD
        last = rows[idx[-1]][1]
        n = max(len(params_of.get(last, [])), len(inputs_of.get(last, [])), 2)
        y2 = row_y[idx[-1]] + n * (CHIP_H + CHIP_GAP) + PAD
        card = cards[trainer]
        g = Group("cluster", data={"trainer": trainer})
        g.add(Rect(x_cluster, y1, chip_w + 2 * PAD, y2 - y1, "#f7f4fa", KIND_STROKE[card.kind], 1.3, None, 8))
        g.add(
            Text(
                x_cluster + PAD,
                y1 + 15,
                f"parameters of {trainer} ({card.optimizer})",
                SIZE,
                KIND_STROKE[card.kind],
                "bold",
            )
        )
        group.add(g)

    theta_y: dict[str, float] = {}
    chip_y: dict[tuple[str, str], float] = {}
    for i, (trainer, inst) in enumerate(rows):
        y = row_y[i]
        card = cards[inst]
        # parameter chips
        for j, p in enumerate(params_of.get(inst, [])):
            cy = y + j * (CHIP_H + CHIP_GAP)
            chip = Group("param", title=p.id, data={"param": p.id})
            colour = WARN if p.no_gradient else "#6d5a7b"
            chip.add(Rect(x_chip, cy, chip_w, CHIP_H, "#ffffff", colour, 1.8 if p.no_gradient else 1.0, None, 9))
            label = ("⚠ " if p.no_gradient else "") + (p.label if inst == trainer else f"{inst} {p.label}")
            chip.add(Text(x_chip + 8, cy + 13, label, SIZE - 1, colour))
            group.add(chip)
        if inst == trainer and card.kind == "optimizer":
            continue
        # θ card
        ty = y
        theta_y[inst] = ty
        g = Group("level", title=f"{inst}: {card.level}", data={"instance": inst})
        warn = bool(card.warned)
        g.add(
            Rect(
                x_theta,
                ty,
                THETA_W,
                THETA_H,
                KIND_FILL[card.kind],
                WARN if warn else KIND_STROKE[card.kind],
                1.4,
                None,
                6,
            )
        )
        g.add(Text(x_theta + 8, ty + 16, f"θ {inst}", SIZE + 1, "#111111", "bold"))
        g.add(Text(x_theta + 8, ty + 31, f"{card.kind} · {card.frequency}", SIZE - 1, "#333333"))
        group.add(g)
        # outer gradients: from θ back to each parameter
        for j, p in enumerate(params_of.get(inst, [])):
            oe = outer.get((inst, p.id))
            if oe is None:
                continue
            cy = y + j * (CHIP_H + CHIP_GAP) + CHIP_H / 2
            colour, dash = _dash(oe.mode)
            if p.no_gradient:
                colour = WARN
            eg = Group("edge outer", data={"src": oe.src, "dst": oe.dst, "mode": oe.mode})
            sy = ty + THETA_H / 2 + (j - (len(params_of[inst]) - 1) / 2) * 5
            eg.add(Path([(x_theta, sy), (x_chip + chip_w + 2, cy)], colour, 1.6, dash, arrow=True))
            eg.add(Text(x_chip + chip_w + 8, cy - 3, oe.label, SIZE - 2, colour))
            group.add(eg)
        # inner gradient
        ie = inner.get(inst)
        if ie is not None:
            ob = Group("edge inner", data={"src": ie.src, "dst": ie.dst})
            oy = ty + 2
            ob.add(Rect(x_obj, oy, obj_w, CHIP_H, "#fff4e8", INNER, 1.2, None, 9))
            ob.add(Text(x_obj + 7, oy + 13, ie.label, SIZE - 1, "#8a4b0f"))
            ob.add(Path([(x_obj, oy + CHIP_H / 2), (x_theta + THETA_W + 2, oy + CHIP_H / 2)], INNER, 1.8, arrow=True))
            group.add(ob)
        for j, e in enumerate(inputs_of.get(inst, [])):
            chip_y[(inst, f"{e.src}|{e.role}|{e.mode}")] = y + j * (CHIP_H + CHIP_GAP)

    # generated quantities: a bus per producer
    for producer, es in producers.items():
        if producer not in theta_y:
            continue
        colour = PALETTE[sorted({cards[p].level for p in producers}).index(cards[producer].level) % len(PALETTE)]
        lx = x_lanes + 12 + LANE * lane_of[producer]
        sy = theta_y[producer] + THETA_H - 8
        bus = Group("bus", data={"producer": producer})
        bus.add(Path([(x_theta + THETA_W, sy), (lx, sy)], colour, 2.0))
        bus.add(Dot(x_theta + THETA_W, sy, 3, colour))
        for e in es:
            found = chip_y.get((e.dst, f"{e.src}|{e.role}|{e.mode}"))
            if found is None:
                continue
            cy = found
            eg = Group("edge generated", data={"src": e.src, "dst": e.dst, "role": e.role, "mode": e.mode})
            eg.add(Path([(lx, sy), (lx, cy + CHIP_H / 2), (x_in, cy + CHIP_H / 2)], colour, 1.4, arrow=True))
            eg.add(Dot(lx, cy + CHIP_H / 2, 2.2, colour))
            eg.add(Rect(x_in + 2, cy, in_w, CHIP_H, "#ffffff", READ_COLOUR.get(e.mode, "#555555"), 1.1, None, 9))
            eg.add(
                Text(x_in + 9, cy + 13, f"{e.role} ← {e.src} · {e.mode}", SIZE - 1, READ_COLOUR.get(e.mode, "#333333"))
            )
            bus.add(eg)
        group.add(bus)
    _gradient_legend(group, 16, y0 + height - 70)
    return group, width, height


def _gradient_legend(group: Group, x: float, y: float) -> None:
    legend = Group("legend")
    entries = [
        ("outer gradient through", *MODE_STYLE["through"]),
        ("truncate k", *MODE_STYLE["truncate"]),
        ("stop", *MODE_STYLE["stop"]),
        ("read (queries)", *MODE_STYLE["read"]),
        ("inner gradient: objective → memory", INNER, None),
        ("no gradient (W001)", WARN, None),
    ]
    cx = x
    for label, colour, dash in entries:
        legend.add(Path([(cx, y), (cx + 34, y)], colour, 2.0, dash, arrow=True))
        legend.add(Text(cx + 40, y + 4, label, SIZE - 1, colour))
        cx += 60 + text_width(label, SIZE - 1)
    y2 = y + 22
    legend.add(Text(x, y2 + 4, "generated quantity (bus from its producer) · read at:", SIZE - 1, "#333333"))
    cx = x + text_width("generated quantity (bus from its producer) · read at:", SIZE - 1) + 12
    for mode, colour in READ_COLOUR.items():
        legend.add(Rect(cx, y2 - 8, 14, 14, "#ffffff", colour, 1.5, None, 4))
        legend.add(Text(cx + 18, y2 + 4, mode, SIZE - 1, colour))
        cx += 36 + text_width(mode, SIZE - 1)
    legend.add(
        Text(
            x,
            y2 + 26,
            "arrows point where the gradient goes: from a memory θ back to the parameters that receive it",
            SIZE - 1,
            "#555555",
        )
    )
    group.add(legend)


def build_scene(model: VizModel, view: str) -> Scene:
    root = Group("nestc-viz", data={"system": model.system})
    y = 0.0
    width = 0.0
    if view in ("hierarchy", "both"):
        g, w, h = hierarchy(model, y, f"{model.system}: level hierarchy on the frequency axis")
        root.add(g)
        y += h + 10
        width = max(width, w)
    if view in ("gradients", "both"):
        g, w, h = gradients(model, y, f"{model.system}: gradient flow")
        root.add(g)
        y += h
        width = max(width, w)
    return Scene(width, y, root)


def walk_shapes(item: Group | Shape) -> list[Shape]:
    if isinstance(item, Group):
        return [s for child in item.shapes for s in walk_shapes(child)]
    return [item]

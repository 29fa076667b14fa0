"""Recipes: a TOML file with a ``[base]`` config and a ``[grid]`` of variants x LRs x seeds.

```toml
name = "quick"
description = "..."
[base]            # any TrainConfig field
model = "allconv"
epochs = 3
[grid]            # every combination becomes one run
variant = ["plain", "batchnorm", "shift-layer+scale-layer"]
lr = [0.04]
seed = [0, 1, 2]  # runs that differ only in seed: `surgeon report` gives mean ± std
case = [          # optional: named sets of field values, one more axis (the name's suffix)
    { tag = "m1", ss_lr_mult = 1.0 },
    { tag = "warm", ss_lr_mult = 1.0, ss_warmup_epochs = 2 },
]
```
A name (``quick``) is looked up among the recipes shipped in ``recipes/``; anything else
is a path to a ``.toml`` file.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import TrainError
from ..rundir import check_name
from .config import TrainConfig, parse_variant

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GRID_KEYS = ("variant", "lr", "seed", "case")


@dataclass
class Recipe:
    name: str
    description: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    path: str

    def configs(self, overrides: dict[str, Any] | None = None) -> list[TrainConfig]:
        """One resolved config per grid point; ``overrides`` (CLI flags) win over the recipe,
        and a flag for a grid key (e.g. ``--lr``) replaces that axis of the grid."""
        overrides = dict(overrides or {})
        grid = {k: list(v) for k, v in self.grid.items()}
        for key in GRID_KEYS:
            if key in overrides and key not in ("variant", "case"):
                grid[key] = [overrides.pop(key)]
        if any(k in overrides for k in ("shift", "scale", "norm")):
            grid.pop("variant", None)  # explicit variant flags replace the recipe's variants
            for key in ("shift", "scale", "norm"):  # and name the whole variant: the rest none
                overrides.setdefault(key, "none")
        axes = [(k, grid[k]) for k in GRID_KEYS if k in grid]
        out = []
        for values in itertools.product(*(v for _, v in axes)):
            point = dict(zip((k for k, _ in axes), values, strict=True))
            d = {**self.base}
            if "variant" in point:
                d.update(parse_variant(point.pop("variant")))
            case = dict(point.pop("case", {}))
            tag = case.pop("tag", "")
            d.update(case)
            d.update(point)
            d.update(overrides)
            d["name"], d["tag"] = "", tag
            out.append(TrainConfig.from_dict(d))
        names = [c.name for c in out]
        if len(set(names)) != len(names):
            raise TrainError(
                f"recipe {self.name} has duplicate runs", hint="check the grid for repeated values"
            )
        return out


def _check_cases(path: Path, cases: list[Any]) -> None:
    """Each case is a table with a unique ``tag`` (a name suffix) and TrainConfig fields."""
    fields = set(TrainConfig.__dataclass_fields__) - {"name", "tag", "variant"}
    tags = []
    for case in cases:
        if not isinstance(case, dict) or not isinstance(case.get("tag"), str):
            raise TrainError(
                f"recipe {path}: each grid case is a table with a tag",
                hint='e.g. case = [{ tag = "m1", ss_lr_mult = 1.0 }]',
            )
        check_name(case["tag"], f"case tag in {path}", TrainError)
        unknown = sorted(set(case) - fields - {"tag"})
        if unknown:
            raise TrainError(
                f"recipe {path}: case {case['tag']!r} sets unknown field(s) {', '.join(unknown)}",
                hint="a case sets TrainConfig fields (not name or variant)",
            )
        # one tag may name cases of different variants (m1 for shift-layer and scale-layer)
        tags.append((case["tag"], *(case.get(k) for k in ("norm", "shift", "scale"))))
    if len(set(tags)) != len(tags):
        raise TrainError(
            f"recipe {path}: repeated case tags",
            hint="give each case its own tag (cases that share one set different shift/scale/norm)",
        )


def available() -> dict[str, Path]:
    """Shipped recipes by name."""
    root = resources.files("surgeon_recipes")
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def load_recipe(name_or_path: str) -> Recipe:
    path = Path(name_or_path)
    if not path.is_file():
        shipped = available()
        if name_or_path not in shipped:
            raise TrainError(
                f"unknown recipe {name_or_path!r}",
                hint=f"use a .toml path or one of: {', '.join(sorted(shipped))}",
            )
        path = shipped[name_or_path]
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TrainError(f"recipe {path} is not valid TOML: {exc}", hint="fix the file") from exc
    unknown = set(raw) - {"name", "description", "base", "grid"}
    if unknown:
        raise TrainError(
            f"recipe {path}: unknown section(s) {', '.join(sorted(unknown))}",
            hint="use name, description, [base], [grid]",
        )
    grid = raw.get("grid", {})
    bad = set(grid) - set(GRID_KEYS)
    if bad:
        raise TrainError(
            f"recipe {path}: unknown grid key(s) {', '.join(sorted(bad))}",
            hint=f"grid keys: {', '.join(GRID_KEYS)}",
        )
    grid = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
    _check_cases(path, grid.get("case", []))
    name = raw.get("name", path.stem)
    check_name(name, f"recipe name in {path}", TrainError)  # the recipe's folder under --out
    recipe = Recipe(
        name,
        raw.get("description", ""),
        dict(raw.get("base", {})),
        grid,
        str(path),
    )
    recipe.configs()  # validate every run up front
    return recipe

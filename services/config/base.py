"""The base of every configuration model, and how a refused configuration is explained.

Every model of the tree forbids unknown keys, so that a misspelt key stops the run at start
instead of being silently ignored. `explain` turns pydantic's errors into one line per
problem that names the key path as the YAML spells it (`trainer.lr`, never the union tags
pydantic adds), the nearest valid key, and, for keys that moved or were removed, what to
write instead (each model's `retired`). Tagged unions in the tree are tagged by `name`.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """A configuration block: unknown keys are refused, with the nearest valid key."""

    model_config = ConfigDict(extra="forbid")

    # Keys that old configs may still carry -> what to write instead. `{path}` is the full
    # key path and `{parent}` the block holding it (see `explain`).
    retired: ClassVar[Mapping[str, str]] = {}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change, one line each."""


@dataclass
class _Place:
    path: list[str] = field(default_factory=list)  # YAML keys, union tags left out
    holder: type[BaseModel] | None = None  # the model whose key is the last of `path`
    variants: dict[str, type[BaseModel]] = field(default_factory=dict)  # holder's union
    node: Any = None  # the annotation of the value at `path`


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _members(annotation: Any) -> list[Any]:
    annotation = _strip(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        return [_strip(member) for member in get_args(annotation)]
    return [annotation]


def _models(annotation: Any) -> list[type[BaseModel]]:
    return [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]


def variant_tag(model: type[BaseModel]) -> str | None:
    """The `name` a variant of a tagged union answers to (its `Literal` value), if any."""
    name = model.model_fields.get("name")
    if name is None or get_origin(name.annotation) is not Literal:
        return None
    (tag,) = get_args(name.annotation)
    return str(tag)


def _variants(annotation: Any) -> dict[str, type[BaseModel]]:
    models = _models(annotation)
    tags = {variant_tag(model): model for model in models}
    if len(models) < 2 or None in tags:
        return {}
    return {str(tag): model for tag, model in tags.items()}


def _place(root: type[BaseModel], loc: Sequence[int | str]) -> _Place:
    """Walk pydantic's error location down the annotations of `root`."""
    place = _Place(node=root)
    variants: dict[str, type[BaseModel]] = {}
    for part in loc:
        if isinstance(part, int) and get_origin(_strip(place.node)) is list:  # a list's item
            place.path.append(str(part))
            place.node = get_args(_strip(place.node))[0]
            continue
        choices = _variants(place.node)
        if isinstance(part, str) and part in choices:  # pydantic names the variant's tag
            place.node, variants = choices[part], choices
            continue
        models = _models(place.node)
        place.holder = models[0] if len(models) == 1 else None
        place.variants, variants = variants, {}
        place.path.append(str(part))
        fields = place.holder.model_fields if place.holder is not None else {}
        place.node = fields[part].annotation if isinstance(part, str) and part in fields else None
    return place


def _dotted(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _unknown_key(place: _Place) -> str:
    *parents, key = place.path
    path, parent = _dotted(*place.path), _dotted(*parents)
    holder = place.holder
    if holder is None:
        return f"unknown key {path}"
    retired: Mapping[str, str] = getattr(holder, "retired", {})
    if key in retired:
        return retired[key].format(path=path, parent=parent or "the top level")
    own = variant_tag(holder)
    for tag, variant in place.variants.items():
        if variant is not holder and key in variant.model_fields:
            return (
                f"{path} is a setting of {_dotted(parent, 'name')} {tag}, not {own}: "
                f"remove it, or set {_dotted(parent, 'name')}: {tag}"
            )
    valid = list(holder.model_fields)
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"unknown key {path} — did you mean {_dotted(parent, close[0])}?"
    return f"unknown key {path}; {parent or 'the top level'} takes {', '.join(valid)}"


def _problem(root: type[BaseModel], error: Mapping[str, Any]) -> str:
    place = _place(root, error["loc"])
    path = _dotted(*place.path)
    kind = error["type"]
    if kind == "extra_forbidden":
        return _unknown_key(place)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = ", ".join(_variants(place.node)) or error.get("ctx", {}).get("expected_tags")
        name = _dotted(path, "name")
        if kind == "union_tag_not_found":
            return f"{name} is missing: one of {tags}"
        return f"{name}: {error['ctx']['tag']!r} is not one of {tags}"
    if kind == "missing":
        return f"{path} is required"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{path}: {message}" if path else message


def explain(error: ValidationError, root: type[BaseModel], source: str) -> str:
    """One line per problem, each starting with `source` (the file the config came from)."""
    return "\n".join(f"{source}: {_problem(root, e)}" for e in error.errors())

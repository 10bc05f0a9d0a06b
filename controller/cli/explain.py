"""`kvmctl explain KIND[.field.path]`: a kind's or a field's documentation, from the models.

The text is the one docs/api.md is generated from (crds/docs.py): field names as written in
manifests, types, defaults, constraints and the docstrings under the fields.
"""

from __future__ import annotations

import argparse
import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

import crds
from crds.docs import FieldDoc, Renderer, summary
from crds.meta import API_VERSION

from .errors import UsageError

_LINK = re.compile(r"\[([^\]]+)\]\(#[^)]*\)")


def register(commands: Any) -> None:
    explain = commands.add_parser(
        "explain",
        help="document a kind or a field: explain vm, explain vm.spec.failoverDomain",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    explain.add_argument("path", metavar="KIND[.FIELD...]")
    explain.set_defaults(func=run_explain)


def _plain(text: str) -> str:
    """The reference's Markdown as terminal text."""
    return _LINK.sub(r"\1", text).replace("\\|", "|").replace("`", "")


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The object type a field holds (through Optional, lists, maps and Annotated), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin in (Annotated, Union, types.UnionType, list, dict):
        arguments = get_args(annotation)
        if origin is Annotated:
            arguments = arguments[:1]
        for argument in reversed(arguments) if origin is dict else arguments:
            found = model_in(argument)
            if found is not None:
                return found
    return None


def _field(renderer: Renderer, model: type[BaseModel], name: str, path: str) -> FieldDoc:
    fields = renderer.fields(model)
    for doc in fields:
        if name in (doc.name, doc.name.lower()) or name.lower() == doc.name.lower():
            return doc
    known = ", ".join(doc.name for doc in fields)
    raise ValueError(f"{path}: {model.__name__} has no field {name!r} (fields: {known})")


def explain(path: str) -> str:
    """The text of `kvmctl explain PATH`."""
    kind_word, *names = path.split(".")
    info = crds.resolve_kind(kind_word)
    renderer = Renderer()
    model: type[BaseModel] = info.model
    lines = [f"KIND:     {info.kind}", f"VERSION:  {API_VERSION}", ""]
    field: FieldDoc | None = None
    for index, name in enumerate(names):
        if not name:
            raise UsageError(f"{path}: empty field name")
        field = _field(renderer, model, name, path)
        nested = model_in(field.info.annotation)
        if nested is None and index < len(names) - 1:
            raise ValueError(f"{path}: {field.name} is of type {_plain(field.type)}: no fields")
        if nested is not None:
            model = nested
    if field is not None:
        lines += [f"FIELD:    {field.name} <{_plain(field.type)}>", ""]
        nested = model_in(field.info.annotation)
        text = field.description or (summary(nested) if nested else "") or "(no description)"
        lines += ["DESCRIPTION:", f"    {text}"]
        lines += [f"    Default: {_plain(field.default)}."]
        if field.rules:
            lines += [f"    Constraints: {_plain('; '.join(field.rules))}."]
        if nested is None:
            return "\n".join(lines)
        lines.append("")
    else:
        lines += ["DESCRIPTION:", f"    {summary(model, module_doc=True)}", ""]
    lines.append("FIELDS:")
    for doc in renderer.fields(model):
        required = " -required-" if doc.default == "required" else ""
        lines.append(f"  {doc.name}\t<{_plain(doc.type)}>{required}")
        if doc.description:
            lines.append(f"    {doc.description}")
    return "\n".join(lines)


async def run_explain(args: argparse.Namespace) -> int:
    print(explain(args.path))
    return 0

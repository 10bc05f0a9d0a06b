"""Generate docs/api.md, the API reference, from the pydantic models.

Every kind, and every object type it contains, gets a table of its fields: name (as written in
manifests), type, default, constraints and description. Descriptions are the docstrings written
under the fields in the models. Run `python -m crds.docs`; tests/test_api_docs.py fails when the
checked-in file is stale.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import types
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import AfterValidator, BaseModel, Strict, StringConstraints
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from . import APPLY_ORDER, KINDS, KindInfo
from .meta import API_VERSION, ObjectMeta, Resource

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "api.md"

VALIDATED_TYPES = {
    "_check_name": ("Name", "DNS-1123 label: lowercase letters, digits, '-', at most 63"),
    "_check_subdomain": ("Subdomain", "DNS-1123 subdomain: lowercase, digits, '-', '.'"),
    "_check_iqn": ("Iqn", "iSCSI name (RFC 3720): `iqn.YYYY-MM.reversed.domain[:id]` or `eui.`"),
    "_check_ifname": ("InterfaceName", "1-15 printable ASCII characters, no '/', ':' or '%'"),
    "_check_lvm_name": ("LvmName", "letters, digits, '+', '_', '.', '-'"),
    "_check_size": ("Size", "a size such as `50G`, `512Mi` (binary multiples), above 0, ≤ 1P"),
    "_check_label_key": ("LabelKey", "qualified name, optionally `prefix/`"),
    "_check_label_value": ("LabelValue", "at most 63 alphanumerics and '-', '_', '.'"),
    "_check_absolute_path": (
        "AbsolutePath",
        "absolute and normalised: no '..', '//', '/./', trailing '/' or control characters",
    ),
    "_check_mac": ("MacAddress", "six lowercase hex pairs, `52:54:00:12:34:56`"),
    "_check_line": ("Line", "one line: no control characters"),
    "_check_export_root": (
        "AbsolutePath",
        "not `/`, `/dev`, `/root`, `/home`, `/usr`, `/var`, nor under /etc, /proc, /sys, /boot",
    ),
    "_check_portal": ("Portal", "`IPV4:PORT` or `[IPV6]:PORT`, port 1-65535"),
    "_plain_value": ("FenceParameterValue", "one word of `A-Za-z0-9._:@/%+,=[]-`, no leading '-'"),
    "check_peer_uri": (
        "LibvirtUri",
        "`qemu[+unix|+tcp|+tls|+ssh|+libssh|+libssh2]://[HOST]/system`, allow-listed parameters",
    ),
}
"""The validated string types of crds/ (mostly meta.py): their name and rule, by validator."""

HEADER = f"""# API reference ({API_VERSION})

Generated from the pydantic models in `crds/` by `python -m crds.docs`; do not edit by hand
(tests/test_api_docs.py fails when this file is stale).

Every object has `apiVersion: {API_VERSION}`, `kind`, `metadata` ([ObjectMeta](#objectmeta)),
`spec` and `status`. Unknown fields are errors everywhere. Users write `metadata` and `spec`;
`status` belongs to the controller and the agents (`kvmctl apply` keeps it as stored).
"""


def field_docstrings(model: type[BaseModel]) -> dict[str, str]:
    """The string literal written under each field of `model` (and of its bases)."""
    found: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        for statement, following in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                found[statement.target.id] = " ".join(following.value.value.split())
    return found


def _anchor(name: str) -> str:
    return name.lower()


@dataclass(frozen=True)
class FieldDoc:
    """One field: as written in manifests, its type (Markdown), default, rules, docstring."""

    name: str
    type: str
    default: str
    rules: list[str]
    description: str
    info: FieldInfo


class Renderer:
    """Collects the object types reachable from the kinds and renders their tables."""

    def __init__(self) -> None:
        self.pending: list[type[BaseModel]] = []
        self.seen: set[type[BaseModel]] = set()

    def link(self, model: type[BaseModel]) -> str:
        if model not in self.seen:
            self.seen.add(model)
            self.pending.append(model)
        return f"[{model.__name__}](#{_anchor(model.__name__)})"

    def type_of(self, annotation: Any) -> tuple[str, list[str]]:
        """The type as shown in the table, and the constraints carried by the type itself."""
        origin, args = get_origin(annotation), get_args(annotation)
        if origin is Annotated:
            inner, constraints = self.type_of(args[0])
            shown, rules = self._metadata(inner, args[1:])
            return shown, constraints + rules
        if origin in (Union, types.UnionType):
            parts = [self.type_of(arg) for arg in args if arg is not type(None)]
            shown = " \\| ".join(part[0] for part in parts)
            return shown, [rule for part in parts for rule in part[1]]
        if origin is Literal:
            return " \\| ".join(f"`{value}`" for value in args), []
        if origin is list:
            inner, rules = self.type_of(args[0])
            return f"list of {inner}", [f"items: {rule}" for rule in rules]
        if origin is dict:
            key, key_rules = self.type_of(args[0])
            value, value_rules = self.type_of(args[1])
            rules = [f"keys: {r}" for r in key_rules] + [f"values: {r}" for r in value_rules]
            return f"map {key} → {value}", rules
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return self.link(annotation), []
        simple = {
            str: "string",
            int: "integer",
            bool: "boolean",
            float: "number",
            datetime: "time (RFC 3339)",
            IPv4Address: "IPv4 address",
            IPv6Address: "IPv6 address",
            IPv4Interface: "IPv4 address/prefix",
            IPv6Interface: "IPv6 address/prefix",
        }
        if annotation in simple:
            return simple[annotation], []
        raise TypeError(f"crds/docs.py cannot render the type {annotation!r}")

    def _metadata(self, inner: str, metadata: tuple[Any, ...] | list[Any]) -> tuple[str, list[str]]:
        shown, rules = inner, []
        for item in metadata:
            if isinstance(item, AfterValidator):
                name = getattr(item.func, "__name__", "")
                if name not in VALIDATED_TYPES:
                    raise TypeError(
                        f"crds/docs.py: describe the validator {name} in VALIDATED_TYPES"
                    )
                shown, rule = VALIDATED_TYPES[name]
                rules.append(rule)
            elif isinstance(item, StringConstraints):
                if item.pattern:
                    rules.append(f"pattern `{item.pattern}`")
                if item.min_length is not None:
                    rules.append(f"at least {item.min_length} characters")
                if item.max_length is not None:
                    rules.append(f"at most {item.max_length} characters")
            elif isinstance(item, Strict):
                pass  # strictness is the rule everywhere (crds/meta.py Strict), not per field
            elif isinstance(item, annotated_types.Ge):
                rules.append(f"≥ {item.ge}")
            elif isinstance(item, annotated_types.Gt):
                rules.append(f"> {item.gt}")
            elif isinstance(item, annotated_types.Le):
                rules.append(f"≤ {item.le}")
            elif isinstance(item, annotated_types.Lt):
                rules.append(f"< {item.lt}")
            elif isinstance(item, annotated_types.MinLen):
                rules.append(f"at least {item.min_length} items")
            elif isinstance(item, annotated_types.MaxLen):
                rules.append(f"at most {item.max_length} items")
            else:
                raise TypeError(f"crds/docs.py cannot render the constraint {item!r}")
        return shown, rules

    def default_of(self, field: FieldInfo) -> str:
        if field.is_required():
            return "required"
        if field.default_factory is not None:
            factory = field.default_factory
            if factory in (list, dict):
                return "empty"
            if isinstance(factory, type) and issubclass(factory, BaseModel):
                return "its defaults"
            return "generated"
        value = field.default
        if value is None or value is PydanticUndefined:
            return "unset"
        if isinstance(value, bool):
            return f"`{str(value).lower()}`"
        if value == "":
            return '`""`'
        return f"`{value}`"

    def fields(self, model: type[BaseModel]) -> list[FieldDoc]:
        """Each field of `model` as the reference describes it."""
        docs = field_docstrings(model)
        found = []
        for name, field in model.model_fields.items():
            shown, rules = self.type_of(field.annotation)
            extra, more = self._metadata(shown, field.metadata)
            found.append(
                FieldDoc(
                    field.alias or name,
                    extra,
                    self.default_of(field),
                    rules + more,
                    docs.get(name, ""),
                    field,
                )
            )
        return found

    def table(self, model: type[BaseModel]) -> list[str]:
        lines = ["| field | type | default | constraints | description |", "|---|---|---|---|---|"]
        for doc in self.fields(model):
            description = doc.description.replace("|", "\\|")
            lines.append(
                f"| `{doc.name}` | {doc.type} | {doc.default} | "
                f"{'; '.join(doc.rules).replace('|', chr(92) + '|')} | {description} |"
            )
        return lines


def summary(model: type[BaseModel], module_doc: bool = False) -> str:
    """The first paragraph of the class's own docstring (or of its module's, for a kind)."""
    doc = model.__dict__.get("__doc__") or ""
    if module_doc:
        doc = sys.modules[model.__module__].__doc__ or doc
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _kind_section(renderer: Renderer, info: KindInfo) -> list[str]:
    model = info.model
    spec = model.model_fields["spec"].annotation
    status = model.model_fields["status"].annotation
    names = ", ".join(f"`{name}`" for name in (info.plural, *info.short_names))
    lines = [f"## {info.kind}", ""]
    text = summary(model, module_doc=True)
    if text:
        lines += [text, ""]
    lines += [f"Names on the command line: {names}.", ""]
    for part, annotation in (("spec", spec), ("status", status)):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            renderer.seen.add(annotation)
            lines += [f"### {info.kind} {part} ({annotation.__name__})", ""]
            lines += [*renderer.table(annotation), ""]
    return lines


def render() -> str:
    """The whole reference."""
    renderer = Renderer()
    lines = [HEADER]
    order = APPLY_ORDER + [kind for kind in KINDS if kind not in APPLY_ORDER]
    for kind in order:
        lines += _kind_section(renderer, KINDS[kind])
    lines += ["## Object types", ""]
    renderer.link(ObjectMeta)
    done: set[type[BaseModel]] = set()
    while renderer.pending:
        pending = sorted(renderer.pending, key=lambda m: m.__name__)
        renderer.pending = []
        for model in pending:
            if model in done or issubclass(model, Resource):
                continue
            done.add(model)
            lines += [f"### {model.__name__}", ""]
            text = summary(model)
            if text:
                lines += [text, ""]
            lines += [*renderer.table(model), ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""click options whose defaults live in the config dataclasses, looked up only when needed.

An option made with `option` is None unless given; `given` drops the Nones, so a config
built from the options keeps its own defaults, and help shows them. Configs and choice lists
are named as `module:name` references and imported when help is printed or a value is checked,
so `t12k` imports a command's modules only when that command runs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import click


def load_ref(ref: str) -> Any:
    """The object that `module:name` names, imported now."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def default(config: str | type, name: str) -> Any:
    """The default of field `name` of a config dataclass (a class or a `module:Class` reference)."""
    cls = load_ref(config) if isinstance(config, str) else config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise KeyError(f"{cls.__name__} has no field {name!r}; fields: {', '.join(fields)}")
    f = fields[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def show(value: Any) -> str:
    """A default as help prints it: 1e-4 as 0.0001, 24.0 as 24, tuples comma-separated."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ", ".join(show(v) for v in value)
    return str(value)


class ConfigOption(click.Option):
    """An option for a config field: None unless given; help ends with the field's default."""

    def __init__(self, *decls: Any, config: str, field: str | None = None, **kw: Any) -> None:
        super().__init__(*decls, **kw)
        self.config, self.field = config, field or self.name

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        spec, text = record
        return spec, f"{text}  [default: {show(default(self.config, self.field))}]"


def option(config: str, *decls: str, field: str | None = None, **kw: Any):
    """click.option for field `field` (the option's name by default) of the dataclass `config`."""
    return click.option(*decls, cls=ConfigOption, config=config, field=field, **kw)


class LazyChoice(click.Choice):
    """click.Choice over a tuple of the package (`module:NAME`), imported when first needed."""

    def __init__(self, ref: str) -> None:  # click.Choice.__init__ would need the choices now
        self.ref, self.case_sensitive = ref, True

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(load_ref(self.ref))


def given(**values: Any) -> dict[str, Any]:
    """The options that were given: None means "left out", so the config's default applies."""
    return {k: v for k, v in values.items() if v is not None}

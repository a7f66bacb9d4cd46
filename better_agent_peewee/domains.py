"""Storage domains: the groups of tables Better Agent routes as one ("Storage domains", docs/operations.md).

Better Agent's ``createCompositeStorage`` sends ``memory`` (threads, messages), ``runs`` and
``streams`` (streams, stream events) to different backends, or omits them; a feature that
needs an omitted one behaves as if that storage area were not configured. `create_tables`,
`check_schema` and `peewee_storage` take ``domains=`` to keep only some of them here.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, NoReturn, Optional, Tuple, Type

import peewee

from .errors import DomainNotConfiguredError
from .models import REFERENCE_MODELS, Models

__all__ = ["DOMAINS", "ALL_DOMAINS", "check_domains", "domain_of", "models_in", "Unconfigured", "ModelSet",
           "physical_tables"]

#: Each domain and its logical tables, as Better Agent's ``storageDomains``.
DOMAINS: Dict[str, Tuple[str, ...]] = {
    "memory": ("memoryThreads", "memoryMessages"),
    "runs": ("runs",),
    "streams": ("streams", "streamEvents"),
}
ALL_DOMAINS: Tuple[str, ...] = tuple(DOMAINS)
_DOMAIN_OF = {table: domain for domain, tables in DOMAINS.items() for table in tables}


def check_domains(domains: Optional[Iterable[str]]) -> Tuple[str, ...]:
    """The domains named by `domains` (None: all three), in their canonical order.

    A string is a comma-separated list (``"memory,runs"``).

    :raises ValueError: an unknown domain name, or none at all.
    """
    if domains is None:
        return ALL_DOMAINS
    names: List[Any] = domains.split(",") if isinstance(domains, str) else list(domains)
    chosen = set()
    for name in names:
        name = name.strip() if isinstance(name, str) else name
        if name not in DOMAINS:
            raise ValueError(f"unknown storage domain {name!r:.80}: the domains are {', '.join(ALL_DOMAINS)}")
        chosen.add(name)
    if not chosen:
        raise ValueError(f"no storage domain given: name at least one of {', '.join(ALL_DOMAINS)}")
    return tuple(d for d in ALL_DOMAINS if d in chosen)


def domain_of(table: str) -> Optional[str]:
    """The domain of logical table `table` (``"runs"`` for ``runs``), or None for no table of ours."""
    return _DOMAIN_OF.get(table)


def models_in(models: Iterable[Type[peewee.Model]], domains: Tuple[str, ...]) -> List[Type[peewee.Model]]:
    """The models of `models` whose table belongs to one of `domains` (order kept)."""
    tables = {table for domain in domains for table in DOMAINS[domain]}
    return [m for m in models if getattr(m._meta, "logical_name", None) in tables]


class Unconfigured:
    """What `storage.memory`, `.runs` or `.streams` is when its domain is omitted: every
    attribute raises `DomainNotConfiguredError`, so nothing is read or written."""

    def __init__(self, domain: str) -> None:
        self._domain = domain

    def __repr__(self) -> str:
        return f"<{self._domain} domain not configured>"

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__"):
            raise AttributeError(name)
        raise DomainNotConfiguredError(self._domain, f"storage.{self._domain}.{name}")


class ModelSet:
    """The models of some domains, listed as `Models.in_dependency_order` lists all five."""

    def __init__(self, models: Models, domains: Optional[Iterable[str]] = None) -> None:
        self.domains = check_domains(domains)
        self._models = models_in(models.in_dependency_order(), self.domains)

    def in_dependency_order(self) -> List[Type[peewee.Model]]:
        """Creation order (threads before messages, which reference them)."""
        return list(self._models)


def physical_tables(domains: Optional[Iterable[str]] = None) -> Tuple[str, ...]:
    """The physical tables of `domains` (default all three), in creation order."""
    return tuple(m._meta.table_name for m in models_in(REFERENCE_MODELS.in_dependency_order(),
                                                         check_domains(domains)))

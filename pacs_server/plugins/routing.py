"""The ``routing`` plugin: OsiriX's routing rules, sending what arrives on to other DICOM nodes.

Each rule of ``[[plugins.routing.rules]]`` says when (``on = "stored"``: each instance as it is
stored; ``on = "stable"``: the whole study once it is stable), what (conditions on the modality,
the calling AE title and any tag values, all of which must match) and where (``to``: registered
node names), optionally as another transfer syntax::

    [[plugins.routing.rules]]
    name = "CT to the reading room"
    on = "stored"
    to = ["READING1", "BACKUP"]
    modality = ["CT", "MR"]                  # any of them
    calling_ae = ["CT_SCANNER"]              # any of them
    tags = { StudyDescription = "*HEAD*", "0008,0080" = "GENERAL HOSPITAL" }
    transfer_syntax = "1.2.840.10008.1.2.1"  # optional: send as Explicit VR Little Endian

Every match becomes a ``send`` job of the archive's queue (``pacs_server/jobs.py``): it survives a
restart and is retried with back-off while a destination is down. Instances routed to one node
go out together on one association. Each job has a ``dedupe_key`` (the rule, the node, the
instance and its content hash; or the study and its stable generation), so a hook that runs
twice queues nothing twice, and an instance overwritten with new content is routed again.

Only the public hooks are used: ``instance_jobs`` (in whichever process stores the instance: its
jobs commit in the same index transaction as the instance, so a crash can never leave a stored
instance unrouted) and ``study_stable`` (in the server process). A rule that cannot be understood is logged with
what to fix and skipped; the others still route.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from ..config import AE_TITLE_RE
from ..dimse.transfer_jobs import send_batch_key
from . import hookimpl, settings_tables
from .settings_tables import TableError
from .types import Instance, JobSpec, Study

if TYPE_CHECKING:
    from ..archive import Archive

log = logging.getLogger(__name__)

NAME = "routing"
SECTION = "plugins.routing.rules"
KEYS = {"name", "on", "to", "modality", "calling_ae", "tags", "transfer_syntax"}
_rules: dict[int, list[Rule]] = {}  # by id(archive): the rules of this process


class RuleError(TableError):
    """A routing rule is malformed; the message names the rule and what to change."""


@dataclass(frozen=True)
class Rule:
    """One routing rule, checked."""

    name: str
    on: str
    to: tuple[str, ...]
    modality: frozenset[str] = frozenset()
    calling_ae: frozenset[str] = frozenset()
    tags: tuple[tuple[int, str, tuple[re.Pattern[str], ...]], ...] = ()
    transfer_syntax: str | None = None
    key: str = field(default="", compare=False)  # short and stable, for dedupe keys

    def matches(self, modalities: Iterable[str], callers: Iterable[str], dataset: Dataset) -> bool:
        if self.modality and not self.modality & {m.upper() for m in modalities}:
            return False
        if self.calling_ae and not self.calling_ae & {c.strip() for c in callers}:
            return False
        return all(_tag_matches(dataset, tag, patterns) for tag, _text, patterns in self.tags)


def _tag_matches(dataset: Dataset, tag: int, patterns: Sequence[re.Pattern[str]]) -> bool:
    element = dataset.get(tag)
    if element is None or element.VR == "SQ":
        return False
    value = element.value
    values = [str(v) for v in value] if element.VM > 1 else ["" if value is None else str(value)]
    return any(p.fullmatch(v) for p in patterns for v in values)


def _pattern(text: str) -> re.Pattern[str]:
    """A DICOM wildcard value (``*`` any run, ``?`` one character) as a regular expression."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text), re.DOTALL)


def _strings(rule: str, key: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
        raise RuleError(f'{rule}: {key} must be a text or a list of texts, e.g. {key} = ["CT", "MR"]')
    return [v.strip() for v in items]


def _tag(rule: str, text: str) -> int:
    """A tag named by keyword (``StudyDescription``) or number (``0008,1030``)."""
    keyword_tag = tag_for_keyword(text)
    if keyword_tag is not None:
        return int(keyword_tag)
    match = re.fullmatch(r"\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?", text.strip())
    if match is None:
        raise RuleError(f"{rule}: tags: {text!r} is neither a DICOM keyword nor a tag like 0008,1030")
    return int(Tag(int(match.group(1), 16), int(match.group(2), 16)))


def parse_rule(number: int, raw: Any) -> Rule:
    """Check one ``[[plugins.routing.rules]]`` table; RuleError says what is wrong."""
    name, where = settings_tables.opening(number, raw, noun="routing rule", section=SECTION, known=KEYS)
    on = raw.get("on", "stored")
    if on not in ("stored", "stable"):
        raise RuleError(f'{where}: on = {on!r}: use "stored" (each instance) or "stable" (the whole study)')
    if "to" not in raw:
        raise RuleError(f'{where}: say where to send with to = ["NODE"] (names from `macpacs nodes list`)')
    to = tuple(_strings(where, "to", raw["to"]))
    callers = _strings(where, "calling_ae", raw.get("calling_ae", []) or [])
    bad = [ae for ae in callers if not AE_TITLE_RE.match(ae)]
    if bad:
        raise RuleError(f"{where}: calling_ae {bad[0]!r} is not an AE title (1-16 characters, no backslash)")
    tags_raw = raw.get("tags", {}) or {}
    if not isinstance(tags_raw, Mapping):
        raise RuleError(f'{where}: tags must be a table, e.g. tags = {{ StudyDescription = "*HEAD*" }}')
    tags = tuple(
        (_tag(where, str(k)), str(k), tuple(_pattern(v) for v in _strings(where, f"tags.{k}", v)))
        for k, v in tags_raw.items()
    )
    syntax = raw.get("transfer_syntax") or None
    if syntax is not None:
        uid = UID(str(syntax))
        if not uid.is_transfer_syntax:
            raise RuleError(
                f"{where}: transfer_syntax {syntax!r} is not a transfer syntax UID "
                "(e.g. 1.2.840.10008.1.2.1 Explicit VR Little Endian, 1.2.840.10008.1.2.5 RLE Lossless)"
            )
        syntax = str(uid)
    return Rule(
        name=name,
        on=on,
        to=to,
        modality=frozenset(m.upper() for m in _strings(where, "modality", raw.get("modality", []) or [])),
        calling_ae=frozenset(callers),
        tags=tags,
        transfer_syntax=syntax,
        key=hashlib.sha256(f"{number}:{name}".encode()).hexdigest()[:10],
    )


def load_rules(options: Mapping[str, Any], report: bool = True) -> list[Rule]:
    """The rules of ``[plugins.routing]`` that can be understood (the others are logged when ``report``:
    the server process says it once, not each DICOM worker again)."""
    return settings_tables.load(
        options, "rules", section=SECTION, parse=parse_rule, report=report, skipped="this rule is skipped"
    )


@hookimpl
def startup(archive: Archive) -> None:
    rules = _rules[id(archive)] = load_rules(archive.plugins.options(NAME), report=archive.role != "dicom-worker")
    if archive.role != "server":
        return
    known = {node.name for node in archive.nodes.list()}
    for rule in rules:
        for name in rule.to:
            if name not in known:
                log.warning(
                    "routing rule %r sends to %r, which is not a registered node: its jobs fail until "
                    "`macpacs nodes add %s ...` registers it",
                    rule.name,
                    name,
                    name,
                )
    log.info("routing: %d rule(s): %s", len(rules), "; ".join(f"{r.name} ({r.on} → {', '.join(r.to)})" for r in rules))


@hookimpl
def shutdown(archive: Archive) -> None:
    _rules.pop(id(archive), None)


@hookimpl
def instance_jobs(archive: Archive, instance: Instance) -> list[JobSpec]:
    rules = [rule for rule in _rules.get(id(archive), []) if rule.on == "stored"]
    if not rules:
        return []
    modality = str(instance.dataset.get("Modality", "") or "")
    uid = instance.sop_instance_uid
    return _send_jobs(
        [rule for rule in rules if rule.matches([modality], [instance.source], instance.dataset)],
        what=uid,
        keys={"SOPInstanceUID": uid},
        dedupe=f"{uid}:{instance.content_hash[:16]}",
        batched=True,
    )


@hookimpl
def study_stable(archive: Archive, study: Study) -> None:
    uid = study.study_instance_uid
    jobs = _send_jobs(
        [
            rule
            for rule in _rules.get(id(archive), [])
            if rule.on == "stable" and rule.matches(study.modalities, study.source_aes, study.dataset)
        ],
        what=f"study {uid}",
        keys={"StudyInstanceUID": uid},
        dedupe=f"{uid}:g{study.generation}",
        batched=False,
    )
    if jobs:
        archive.jobs.submit_many(jobs)
        log.info("routing: study %s queued for %s", uid, ", ".join(j.payload["node"] for j in jobs))


def _send_jobs(rules: list[Rule], *, what: str, keys: dict[str, str], dedupe: str, batched: bool) -> list[JobSpec]:
    """A ``send`` job per matching rule and destination. Instances routed to one node share a
    batch key (one association for them); a study is one job of its own."""
    return [
        JobSpec(
            "send",
            f"route {what} to {node} ({rule.name})",
            {"node": node, "keys": keys, "transfer_syntax": rule.transfer_syntax},
            send_batch_key(node, rule.transfer_syntax) if batched else None,
            f"route:{rule.key}:{node}:{dedupe}",
        )
        for rule in rules
        for node in rule.to
    ]

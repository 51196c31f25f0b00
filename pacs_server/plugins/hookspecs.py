"""The plugin hooks: each one documented function, the whole contract between the core and a plugin.

A plugin is a module (or object) with functions of these names, marked with
``macpacs.pacs_server.plugins.hookimpl``, found through the ``macpacs.plugins`` entry point group
and enabled by its entry point's name (docs/plugins.md). An implementation may take any subset
of a hook's arguments, by name.

The core calls these, never an adapter, so that every protocol triggers them the same way:
``accept_instance``, ``instance_jobs`` and ``instance_stored`` come from the one ingest path,
whatever brought the instance (C-STORE, STOW-RS, upload, ``macpacs import``, C-GET). Plugins
load in every process of the archive, DICOM worker processes included: ``archive.role`` says
which one this is.

A hook that raises is logged with the plugin's name and skipped; the other plugins still run,
and nothing acknowledged is lost. Hooks run in the thread of the request that caused them:
slow work (sending, calling a RIS) belongs in ``archive.jobs``, not in the hook itself.

Room to grow: the integration and scale-out issues add hooks here (a study that became stable,
jobs, extra DICOM services such as worklists, blob stores), each documented the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from .types import Instance, JobSpec, Study

if TYPE_CHECKING:
    from ..archive import Archive

hookspec = pluggy.HookspecMarker("macpacs")


@hookspec
def startup(archive: Archive) -> None:
    """The archive of this process is open; the plugin may set itself up.

    Called once per process, after every part of ``archive`` exists and before any listener
    accepts: in the main server process (``archive.role == "server"``), in each DICOM worker
    process (``"dicom-worker"``) and in each CLI command (``"command"``). Start a listener of
    your own only in the server process.
    """


@hookspec
def shutdown(archive: Archive) -> None:
    """The process is closing its archive (a clean stop); release what ``startup`` took."""


@hookspec
def accept_instance(archive: Archive, instance: Instance) -> str | None:
    """Decide whether ``instance`` may be stored, before anything is written.

    Return None to accept, or a reason (one line an administrator understands) to refuse. A
    refusal is answered as DICOM status 0x0124 (refused: not authorized) to a C-STORE or C-GET,
    as a failed instance with that reason to STOW-RS and upload, and as a refused file to
    ``macpacs import``. Every plugin is asked; one refusal is enough. ``instance.dataset`` is
    the header (no pixel data): read it, do not change it.
    """


@hookspec
def instance_stored(archive: Archive, instance: Instance, outcome: str) -> None:
    """``instance`` is durable on disk and in the index (``outcome``: ``"stored"`` or ``"overwritten"``).

    Called before the sender is answered, for every protocol that ingests. Re-sends of an
    identical instance and re-sends that were kept out (``on_conflict = keep``) are not
    reported: nothing changed.
    """


@hookspec
def instance_jobs(archive: Archive, instance: Instance, outcome: str) -> Sequence[JobSpec] | None:
    """Background jobs that ``instance`` calls for, queued in the transaction that indexes it.

    Return a list of ``JobSpec`` (or None). Ingest asks once the file is durable, just before
    its index row is committed, and commits the jobs with the row: an instance is never indexed
    without its jobs, nor are jobs queued for an instance that is not (a crash between two
    separate commits would lose the routing of an acknowledged instance), and queueing costs no
    transaction of its own. Use it for work that must follow every stored instance (routing,
    webhooks); ``instance_stored`` is for telling, after the commit. ``outcome`` is
    ``"stored"`` or ``"overwritten"``. Called in whichever process stores the instance, before
    the index's writer lock is taken: only decide here (no I/O), the jobs run in the server
    process. A job the index cannot hold (a payload that is not JSON, a kind over 32 bytes, a
    key over 255) is logged and dropped; the instance is stored all the same.
    """


@hookspec
def register_routes(archive: Archive) -> Any:
    """Web routes of the plugin: a FastAPI ``APIRouter`` (or a list of them) to mount on the web port.

    Routes are mounted as the router declares them; use a prefix of your own, such as
    ``/plugins/<name>``. Authentication is the plugin's: ``macpacs.pacs_server.web.auth``'s
    ``require_read``/``require_admin`` dependencies give the archive's own rules.
    """


@hookspec
def dicom_services(archive: Archive) -> Any:
    """Extra DICOM services the plugin serves as SCP: a ``DicomService`` (or a list of them).

    ``DicomService`` (``macpacs.pacs_server.plugins.dicom_services``) names a SOP class (the
    Modality Worklist FIND model, MPPS, Storage Commitment...) and its handlers: ``find`` for
    C-FIND, ``n_create``, ``n_set`` and ``n_action``. The DICOM listener asks once, in every
    process that serves associations (the server process with ``dicom.workers = 1``, else each
    DICOM worker), adds a presentation context for each class and calls the handlers with a
    ``DicomRequest`` once the association is admitted and the peer's node has the service's
    ``right``. Handlers run in the association's thread: a slow one delays only its peer.

    The classes the archive serves itself (Verification, Storage, Query/Retrieve) cannot be
    taken over; a class two plugins declare goes to the first, and the second is logged.
    """


@hookspec
def study_stable(archive: Archive, study: Study) -> None:
    """No instance of ``study`` arrived for ``storage.stable_after`` seconds (60 by default).

    Called once per study, in the main server process only (``archive.role == "server"``),
    whichever process stored its instances; again, with ``study.generation`` one higher, if
    instances arrive later. It is recorded in the index, so a restart neither repeats nor loses
    it; but hooks interrupted by a stop are called again for that generation, by whichever server
    shares the index, 5 minutes after they began: queue work with a ``dedupe_key`` naming the
    study and its generation (as the routing and webhooks plugins do) so that a repeat queues
    nothing twice. Studies already in
    the archive when the feature was installed count as stable. Slow work goes to
    ``archive.jobs``.
    """

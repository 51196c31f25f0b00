"""Every DIMSE status code the archive sends, named once (PS3.7 Annex C, PS3.4 Annexes B and C).

One table for every protocol: the C-STORE, C-FIND, C-MOVE and C-GET services answer with these,
ingest maps its outcomes to them, and STOW-RS reports them as failure and warning reasons.
A value that means different things to different services (0xA900, 0xC000) is named once, for
what it says to all of them.
"""

from __future__ import annotations

SUCCESS = 0x0000  # PS3.7 C.1.1
PENDING = 0xFF00  # C-FIND, C-MOVE, C-GET: matches or sub-operations continue (PS3.4 C.4.1.1.4, C.4.2.1.5)
CANCEL = 0xFE00  # matching or sub-operations terminated by a C-CANCEL (PS3.4 C.4.1.1.4, C.4.2.1.5)

WARNING_SUBOPERATIONS = 0xB000  # C-MOVE/C-GET: sub-operations complete, one or more failed (PS3.4 C.4.2.1.5)
ELEMENTS_DISCARDED = 0xB006  # C-STORE warning: elements discarded, here the stored copy kept (PS3.4 B.2.3)

NOT_AUTHORIZED = 0x0124  # refused: not authorized, a general status (PS3.7 C.5)
OUT_OF_RESOURCES = 0xA700  # C-STORE, C-FIND refused: out of resources (PS3.4 B.2.3, C.4.1.1.4)
SUBOPERATIONS_IMPOSSIBLE = 0xA702  # C-MOVE/C-GET refused: unable to perform sub-operations (PS3.4 C.4.2.1.5)
UNKNOWN_MOVE_DESTINATION = 0xA801  # C-MOVE refused: move destination unknown (PS3.4 C.4.2.1.5)
# C-STORE: data set does not match SOP class; C-FIND/C-MOVE/C-GET: identifier does not match
# SOP class (PS3.4 B.2.3, C.4.1.1.4, C.4.2.1.5)
DOES_NOT_MATCH_SOP_CLASS = 0xA900
# C-STORE: cannot understand (Cxxx); C-MOVE/C-GET failed: unable to process (PS3.4 B.2.3, C.4.2.1.5)
UNABLE_TO_PROCESS = 0xC000
QUERY_UNABLE_TO_PROCESS = 0xC001  # C-FIND failed: unable to process (Cxxx, PS3.4 C.4.1.1.4)
STORE_HANDLER_FAILED = 0xC211  # C-STORE, cannot understand: what pynetdicom answers when its handler raises
FIND_HANDLER_FAILED = 0xC311  # C-FIND, unable to process: what pynetdicom answers when its handler raises

# DIMSE-N services (MPPS, Storage Commitment, any plugin service: PS3.7 C.4, C.5; PS3.4 F.7.2, J.3)
PROCESSING_FAILURE = 0x0110  # also a Storage Commitment failure reason (PS3.4 J.3.2.1.1.2)
INVALID_ATTRIBUTE_VALUE = 0x0106
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112  # also a Storage Commitment failure reason
INVALID_OBJECT_INSTANCE = 0x0117
CLASS_INSTANCE_CONFLICT = 0x0119  # also a Storage Commitment failure reason
MISSING_ATTRIBUTE = 0x0120
SOP_CLASS_NOT_SUPPORTED = 0x0122
NO_SUCH_ACTION_TYPE = 0x0123

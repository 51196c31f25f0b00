"""``/etc/kcpassword``: the obfuscated password macOS's login window uses for automatic login.

Algorithm (shared/reference/osirix-and-macos.md, "Automatic login", manual route): the UTF-8
password, padded with zero bytes up to the next multiple of 12 (a length that is already a
multiple of 12 gets 12 more), XORed with the 11-byte key repeated cyclically. Zero padding
XOR key = the key bytes the reference describes. It is obfuscation, not encryption: the file
must be root:wheel, mode 600.
"""

from __future__ import annotations

KEY = bytes([0x7D, 0x89, 0x52, 0x23, 0xD2, 0xBC, 0xDD, 0xEA, 0xA3, 0xB9, 0x1F])
BLOCK = 12


def encode(password: str) -> bytes:
    """The bytes of /etc/kcpassword for ``password``."""
    data = password.encode("utf-8")
    padded = data + bytes(BLOCK - len(data) % BLOCK)  # multiple of 12 -> 12 more bytes
    return bytes(b ^ KEY[i % len(KEY)] for i, b in enumerate(padded))


def matches(content: bytes, password: str) -> bool:
    """Whether an existing kcpassword file encodes ``password`` (idempotence check)."""
    return content == encode(password)

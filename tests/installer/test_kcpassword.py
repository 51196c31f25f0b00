"""/etc/kcpassword against vectors computed from the documented algorithm (reference, auto-login)."""

from __future__ import annotations

import pytest

from macpacs.installer import kcpassword

KEY = [0x7D, 0x89, 0x52, 0x23, 0xD2, 0xBC, 0xDD, 0xEA, 0xA3, 0xB9, 0x1F]


def documented(password: str) -> bytes:
    """The reference's words, step by step: XOR with the cyclic key, pad with key bytes to a multiple of 12,
    a multiple of 12 gets 12 more."""
    data = list(password.encode("utf-8"))
    out = [b ^ KEY[i % 11] for i, b in enumerate(data)]
    total = (len(data) // 12 + 1) * 12
    out += [KEY[i % 11] for i in range(len(data), total)]
    return bytes(out)


@pytest.mark.parametrize("length", [1, 10, 11, 12, 13, 23, 24, 25])
def test_lengths(length):
    password = "".join(chr(ord("a") + i % 26) for i in range(length))
    encoded = kcpassword.encode(password)
    assert encoded == documented(password)
    assert len(encoded) % 12 == 0 and len(encoded) > length


def test_lengths_11_12_13_sizes_and_bytes():
    assert len(kcpassword.encode("a" * 11)) == 12
    assert len(kcpassword.encode("a" * 12)) == 24  # already a multiple of 12: 12 more
    assert len(kcpassword.encode("a" * 13)) == 24
    # "a" = 0x61; by hand: 0x61^0x7D = 0x1C, 0x61^0x89 = 0xE8; the 12th byte of "a"*11 is padding,
    # key index 11 % 11 = 0 -> 0x7D; the 12th byte of "a"*12 is 0x61^0x7D = 0x1C and padding
    # continues at key index 12 % 11 = 1 -> 0x89.
    assert kcpassword.encode("a" * 11)[:2] == bytes([0x1C, 0xE8])
    assert kcpassword.encode("a" * 11)[11] == 0x7D
    assert kcpassword.encode("a" * 12)[11] == 0x1C and kcpassword.encode("a" * 12)[12] == 0x89


def test_known_vector_and_utf8():
    assert kcpassword.encode("password").hex() == "0de82150a5d3af8ea3b91f7d"  # checked by hand, byte by byte
    assert kcpassword.encode("é") == documented("é")  # UTF-8, two bytes
    assert kcpassword.matches(kcpassword.encode("x y"), "x y") and not kcpassword.matches(b"", "x y")

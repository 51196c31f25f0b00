"""Fixtures of the storage tests: a place of its own per test in the session's SeaweedFS S3
gateway (``gateway``, tests/conftest.py)."""

from __future__ import annotations

import uuid

import pytest

from tests.s3gateway import ACCESS_KEY, SECRET_KEY, Gateway


@pytest.fixture
def s3_url(gateway: Gateway) -> str:
    """``s3://`` URL of an empty place in the gateway: one bucket, a prefix of this test's own."""
    return f"s3://{gateway.bucket('macpacs')}/t-{uuid.uuid4().hex[:12]}"


def s3_settings(gateway: Gateway, **changes: object) -> object:
    """The ``[s3]`` settings of a store on ``gateway`` (credentials in the settings, not the environment)."""
    from macpacs.pacs_server.config import S3Settings

    settings = S3Settings(endpoint=gateway.endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    for name, value in changes.items():
        setattr(settings, name, value)
    return settings

"""A real S3 API on loopback for tests: moto's ThreadedMotoServer on a free 127.0.0.1 port.

The fixture sets the standard variables (AWS_ENDPOINT_URL, dummy keys, region) for this process
and its children, so kdpipe, pandas, DuckDB and subprocess drivers all reach the server the way
they would reach a real store; teardown stops the server and restores the environment."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server running for the whole test session."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests (dev extra)")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_workdir(s3_server) -> str:
    """A fresh s3:// prefix (the bucket is created on first write)."""
    return f"s3://kdpipe-test/{uuid.uuid4().hex[:12]}"

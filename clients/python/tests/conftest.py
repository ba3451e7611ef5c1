"""The tests run against a real local cluster: `tests/tests/python_client.rs` starts one and runs
pytest with its URL and token in ORCH_TEST_URL and ORCH_TEST_TOKEN."""

import os

import pytest

from orchestrator_client import Client


@pytest.fixture(scope="session")
def url() -> str:
    value = os.environ.get("ORCH_TEST_URL")
    if not value:
        pytest.fail("ORCH_TEST_URL is not set: run these tests through `cargo nextest run -p orch-tests --test python_client`")
    return value


@pytest.fixture(scope="session")
def client(url: str) -> Client:
    token = os.environ.get("ORCH_TEST_TOKEN")
    if not token:
        pytest.fail("ORCH_TEST_TOKEN is not set")
    return Client(url, token=token, timeout=60)

"""Shared pytest fixtures live in tests/fixtures/, one module per collaborator."""

pytest_plugins = [
    "tests.fixtures.model",
    "tests.fixtures.services",
    "tests.fixtures.stack",
    "tests.fixtures.api",
    "tests.fixtures.faults",
]

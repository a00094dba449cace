"""Shared fixtures: a real PostgreSQL server, a fresh migrated database per test, Ray Serve, consumers."""

pytest_plugins = ["tests.db_fixtures", "tests.consumer_fixtures", "tests.ray_fixtures"]

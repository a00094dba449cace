"""Shared fixtures: a real PostgreSQL server, a fresh migrated database per test, Ray Serve, consumers,
and local servers that speak the Supabase Storage and Replicate protocols."""

pytest_plugins = ["tests.db_fixtures", "tests.consumer_fixtures", "tests.ray_fixtures", "tests.fakes.fixtures"]

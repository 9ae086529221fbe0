"""Loopback HTTP servers used by the tests."""

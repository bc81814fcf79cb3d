"""Tests of the sandboxd Python client, run against a real daemon (``SANDBOXD_SOCKET``)."""

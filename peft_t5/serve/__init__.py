"""Serve adapters over HTTP: one base, many adapters, concurrent requests batched across adapters.

app.py (routes, API key, errors, metrics), batcher.py (requests -> one mixed-adapter generate call),
ratings.py (SQLite store of blind ratings), page.html (try adapters, rate jokes blind).
"""

"""Serve adapters over HTTP: one base, many adapters, concurrent requests decoded together, each row through its own
adapter.

app.py (the app, auth, errors, metrics), routes_native.py and routes_openai.py (the routes), engine.py (continuous
batching over every method), decoding.py (how each row's next token is chosen), t5_runner.py (T5's math over slots),
ratings.py (SQLite store of blind ratings), page.html (try adapters, rate jokes blind).
"""

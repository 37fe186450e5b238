"""Reference pages generated from the code at build time (docs/hooks.py runs them; tests/test_docs.py checks them)."""

"""The ``walship`` command line: serve a node, inspect a WAL, run the demo.

``main`` builds one typer app from the command modules: ``serve`` (serve.py), ``wal verify`` and
``wal dump`` (wal.py), ``demo`` (demo.py). ``process.py`` starts and stops ``walship serve``
child processes for the demo and the crash tests.
"""

"""The ``walship`` command line: serve a node, inspect a WAL, run the demo, and the rest.

``main`` builds one typer app from the command modules: ``serve`` (serve.py), ``wal verify`` and
``wal dump`` (wal.py), ``demo`` (demo.py) and the others. The CLI only parses arguments and
prints: what the commands do is library code outside this package (the offline WAL reader in
``wal/offline.py``, child ``walship serve`` processes in ``testing/process.py``), and nothing
outside ``cli/`` imports it (``tests/test_layering.py``).
"""

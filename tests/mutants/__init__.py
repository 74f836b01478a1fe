"""Deliberately broken builds of walship, for showing that ``walship verify`` catches them.

Each module patches one promise out of the real server and then runs the real CLI, so
``python -m tests.mutants.NAME serve ...`` is ``walship serve`` with exactly one defect.
``walship verify --server-module tests.mutants.NAME`` must fail against each of them; they are
never imported by the product.
"""

"""Tools for testing walship against faults: a fault-injecting TCP proxy and process helpers.

Shipped in the package so that tests and ``walship verify`` use the same machinery.
"""

"""The HTTP API of a node: ``create_app(node)`` gives the FastAPI application to serve."""

from walship.http.app import create_app

__all__ = ["create_app"]

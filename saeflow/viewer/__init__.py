"""A local web viewer for flow atlases: overview, feature search and pages, interactive flow
graphs, and steering (``saeflow view ATLAS``). See docs/viewer.md for the pages and the API."""

from saeflow.viewer.server import DEFAULT_HOST, DEFAULT_PORT, ViewerServer, create_app

__all__ = ["create_app", "ViewerServer", "DEFAULT_HOST", "DEFAULT_PORT"]

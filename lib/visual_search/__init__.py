"""visual_search: distributed search-by-photo for e-commerce catalogs on Ray."""

__version__ = "0.1.0"

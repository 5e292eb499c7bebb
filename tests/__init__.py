"""moetx test suite; a package so rank workers can import `tests.bodies` by name."""

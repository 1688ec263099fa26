# The shared fixtures (real app, real storage, real status stores) serve the core tests in tests/
# and every partner's own tests in plugins/<name>/tests/.
pytest_plugins = ["tests.fixtures"]

# The fixtures live in tests/fixtures.py, registered for the whole tree by the root conftest.py,
# so that each partner folder's own tests (plugins/<name>/tests/) share them.

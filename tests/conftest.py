# Fixtures live in tests/fixtures.py, registered for the whole tree by the root conftest.py so that
# partner folders' own tests (plugins/<name>/tests/) share them. Names re-exported for imports.
from tests.fixtures import *  # noqa: F403
from tests.fixtures import (  # noqa: F401  # noqa: F401
    ADMIN_TOKEN,
    REDIS_URL,
    ROOT,
    LiveGateway,
    free_port,
    kochava_samples,
    make_config,
    new_key,
    start_gateway,
    stop_gateway,
)

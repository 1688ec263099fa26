"""``gateway serve`` with the bare endpoint (bench/bare_app.py) in place of the gateway: the same
server, protocol, loop, worker count and settings, so the two differ only in the application.

    python bench/serve_bare.py [--host H] [--port P] [--workers N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` importable (workers too)
    sys.path.insert(0, str(ROOT))


def main() -> int:
    from gateway.cli import serve_command
    from gateway.config import load_config

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    return serve_command(
        load_config(), args.host, args.port, args.workers, app="bench.bare_app:create_app"
    )


if __name__ == "__main__":
    sys.exit(main())

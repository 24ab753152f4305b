"""``python3 -m colo_proxy.disk``: the same as ``colo-proxy disk-agent``."""

import sys

from colo_proxy.disk.cli import main

sys.exit(main())

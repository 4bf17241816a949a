"""`python -m tenantstore.keys`: see `tenantstore.keys.cli`."""

import sys

from .cli import main

sys.exit(main())

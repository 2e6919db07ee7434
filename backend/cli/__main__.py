"""`python -m backend.cli COMMAND`."""

import sys

from backend.cli import main

sys.exit(main())

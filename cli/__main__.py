"""`python -m cli ...` is `fedtransfer ...` (containers that mount the repository without installing it)."""

import sys

from cli.main import main

sys.exit(main())

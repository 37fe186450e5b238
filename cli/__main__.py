"""`python -m fedtransfer.cli ...` is `fedtransfer ...` (containers that mount the repository without installing it)."""

import sys

from fedtransfer.cli.main import main

sys.exit(main())

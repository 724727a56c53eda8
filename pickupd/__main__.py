"""`python -m pickupd`: the same as the `pickupd` command."""

import sys

from pickupd.cli import main

sys.exit(main())

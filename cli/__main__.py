"""`python -m cli ARGS` is `tandem ARGS`."""

import sys

from cli import main

sys.exit(main())

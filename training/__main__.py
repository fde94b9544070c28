"""`python -m training ARGS` is `tandem train ARGS`; torchrun starts it as `torchrun ... -m training ARGS`."""

import sys

from training.cli import train_main

sys.exit(train_main())

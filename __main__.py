"""`python -m qdistill ...` (and `torchrun ... -m qdistill ...`): the `qdistill` command."""
import sys

from .cli import main

sys.exit(main())

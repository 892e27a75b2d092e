"""``python -m interleaf <verb>`` (and ``torchrun ... -m interleaf eval ...``): the CLI."""

import sys

from interleaf.cli import main

sys.exit(main())

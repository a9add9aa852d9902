"""``python -m distillspec`` behaves like the ``distillspec`` command."""

import sys

from distillspec.tools.cli import main

sys.exit(main())

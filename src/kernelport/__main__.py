"""``python -m kernelport`` runs the same CLI as the ``kernelport`` command."""

import sys

from kernelport.cli import main

sys.exit(main())

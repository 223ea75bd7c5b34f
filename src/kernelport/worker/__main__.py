"""``python -m kernelport.worker SOCKET_FD ARENA_FD PARENT_PID``: started by the server."""

import sys

from kernelport.worker.main import main

sys.exit(main(sys.argv[1:]))

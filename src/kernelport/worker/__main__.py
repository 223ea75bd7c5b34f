"""``python -m kernelport.worker SOCKET_FD ARENA_FD PARENT_PID``: started by the server;
``python -m kernelport.worker --shared LISTEN_FD STOP_FD PARENT_PID``: started by the
supervisor of ``--frontends N`` for all its front ends."""

import sys

if sys.argv[1:2] == ["--shared"]:
    from kernelport.worker.shared import serve_shared

    sys.exit(serve_shared(sys.argv[2:]))
else:
    from kernelport.worker.main import main

    sys.exit(main(sys.argv[1:]))

"""KernelPort: a KServe V2 / Open Inference Protocol inference server.

Importing this package has no side effects; ``kernelport.server.Server`` is the entry point
for embedding, ``kernelport serve`` for the command line.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

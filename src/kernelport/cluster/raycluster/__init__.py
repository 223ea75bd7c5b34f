"""Cluster mode: KernelPort nodes run as Ray actors behind the gateway; mDNS finds the head.

Only ``controller`` and ``launch`` import Ray, and only when called, so that single-machine
users never import it. ``plan`` (placement) and ``slot`` (one node's server) are plain Python.
"""

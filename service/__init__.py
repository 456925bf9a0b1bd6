"""The gRPC front end: servicers, settings, the asyncio batcher and the worker pool.

This package never imports torch: the model lives in worker processes (see `workers`).
"""

__version__ = "0.1.0"

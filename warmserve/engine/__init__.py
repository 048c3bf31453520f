"""vLLM engines that switch among the models of one family in place.

:class:`warmserve.engine.engine.Engine` runs one vLLM engine per (device, family) inside the
calling process; the worker plugin hosts it and hands it weights from its host memory pool.
"""

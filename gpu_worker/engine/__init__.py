"""Continuous-batching engine: Sequence, KVBlockManager, Scheduler, Engine (schedule -> run -> postprocess)."""

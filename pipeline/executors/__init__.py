"""Executors run a job's stages over its input shards into its sink: ``local`` (this process) and
``ray`` (a cluster). They share one base (:mod:`pipeline.executors.base`) and only schedule."""
from __future__ import annotations

from pipeline.executors.base import Executor, ShardOutcome
from pipeline.executors.local import LocalExecutor
from pipeline.executors.ray import RayExecutor

EXECUTORS: dict[str, type[Executor]] = {cls.name: cls for cls in (RayExecutor, LocalExecutor)}

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "ShardOutcome"]

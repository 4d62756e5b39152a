"""Output formats behind one interface (:class:`pipeline.sinks.base.Sink`); today WebDataset."""
from pipeline.sinks.base import Sink
from pipeline.sinks.storage import Directory
from pipeline.sinks.webdataset import WebDatasetSink

__all__ = ["Directory", "Sink", "WebDatasetSink"]

"""Counting the torch calls one thread makes (what the GPU stand-in tests assert about the model thread)."""
from torch.overrides import TorchFunctionMode


class Calls(TorchFunctionMode):
    """Counts the torch calls made on the thread that enters it (modes are per thread)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

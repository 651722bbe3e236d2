"""The fast path beside the plain model: how this machine runs it for inference.

`ModelRunner` is what `generate` and the engine call; it owns the C decode step
(`decode_step.py`), the kernel-backed linear layers (`linear.py`), the thread policy
(`threads.py`) and the engine's paged KV cache (`paged.py`).
"""

from mistral_nemo.runtime.runner import ModelRunner

__all__ = ["ModelRunner"]

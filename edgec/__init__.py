"""edgec: PyTorch checkpoints to small, fast, verified ONNX artifacts."""

__version__ = "0.1.0"

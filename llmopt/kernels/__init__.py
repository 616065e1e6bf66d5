"""C++ sources of llmopt's CPU kernels for ONNX Runtime, built on first use by
:mod:`llmopt.runtime.kernels`."""

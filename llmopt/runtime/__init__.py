"""Run model packages on ONNX Runtime: sessions, the generation loop, embeddings."""

"""Serving: bundle loading, ONNX Runtime sessions, preprocessing, dynamic batcher,
gRPC services, zero-shot, metrics, config, client and the `tandem` CLI."""

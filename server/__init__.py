"""Serving: ONNX Runtime sessions, dynamic batcher, gRPC services, metrics, config, wire format and client.

Reads model bundles through the `bundle` package; never imports `training`
or torch (tests/test_layout.py checks both).
"""

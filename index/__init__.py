"""Collections: FAISS index + id map + metadata + write-ahead log + snapshots.

Not built yet: the Collections service in proto/tandem/v1/tandem.proto fixes
the contract and answers UNIMPLEMENTED until this package lands.
"""

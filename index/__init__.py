"""Collections: durable items (SQLite, index/store.py) and the FAISS index derived from them
(index/collection.py, on the GPU when FAISS can: index/gpu.py), opened and created by index/manager.py.
index/backend.py is the whole contract the gRPC layer uses; index/filters.py compiles metadata filters."""

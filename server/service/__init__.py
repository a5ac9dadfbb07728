"""The gRPC service: app (start, health, shutdown), servicer, interceptors, status mapping, ``serve``.

The only package of facegallery that imports grpc or the generated stubs.
"""

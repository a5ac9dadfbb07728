"""The face pipeline: decode -> detect -> landmarks -> align -> embed (``pipeline.FacePipeline``).

Knows images and models; knows nothing of galleries or gRPC. Imports only ``facegallery.server.contract``.
"""

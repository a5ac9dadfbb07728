"""What the server and ``facegallery.export`` share: the exception tree (``errors``), ``Face`` and
``ImageKind`` (``face``), the model manifest and chip spec (``manifest``), durable file writes
(``files``), the image file suffixes the decoder reads (``images``), default locations
(``paths``), stage timings (``timing``) and returning freed heap to the OS (``process_memory``).
Imports nothing else of facegallery."""

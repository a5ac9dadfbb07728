"""Offline work, one sub-package per job: ``dlib`` (model conversion), ``train``, ``evaluate``.

May import ``facegallery.server.contract`` and ``facegallery.server.face``; the server never imports it.
"""

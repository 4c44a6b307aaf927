"""The model side of the service: one interface the pipeline talks to, and what stands behind it.

::

    base.py        Backend (the interface), ModelInfo (what a loaded model is), Prediction
    session.py     Backend in this process: an onnxruntime session
    owner_client.py  Backend in front of an owner process that holds the session (shared memory)
    owner_server.py  the owner process: accepts workers, merges their rows, runs the sessions
    wire.py        the owner topology's wire format: slab, message heads, heartbeat
    repository.py  the loaded models and versions: load, unload, replace, route by name

The pipeline (``service.pipeline``) gets a :class:`~service.serving.repository.Loaded` from the
repository for each request (model name and version, or the default) and submits its rows to that
model's batcher; the batcher calls the backend. Nothing here knows HTTP or gRPC. Kept import-light:
onnxruntime is imported by ``session.py`` only.
"""

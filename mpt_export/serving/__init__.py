"""Serving a bundle: the continuous-batching engine (``engine``, no HTTP in it), the OpenAI-compatible ASGI app
(``app``), the server process (``server``: uvicorn, signals, drain) and the load bench (``bench``). Only ``engine``
is imported by default; the web stack is an extra (``pip install 'mpt-export[serve]'``)."""

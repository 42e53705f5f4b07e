"""``mammacls serve``: one model behind a local web page and a REST API (FastAPI on uvicorn).

``service`` opens the model and answers in ``predict --json``'s records; ``batching`` puts frames
from concurrent requests through the network together; ``uploads`` reads multipart bodies into memory
under limits; ``app`` is the HTTP face; ``server`` binds and runs it. Nothing here imports torch
unless explanations are asked for.
"""

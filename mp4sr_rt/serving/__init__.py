"""Serving on Triton Inference Server: the request protocol, the Python-backend models, their
model repository and the server process (`mp4sr-rt serve`)."""

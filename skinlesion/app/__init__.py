"""A local web page for one model file: drop images, see each one's class
probabilities, the melanoma flag and the Grad-CAM overlay.

    python -m skinlesion.app models/model.pt [--host 127.0.0.1] [--port 8000]

Standard library HTTP only: ``GET /`` is the page, ``POST /api/predict`` takes one
image as the request body and answers JSON. A research tool, not a diagnosis.
"""
